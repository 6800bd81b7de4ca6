"""The detector object: equal to the kNN functions it wraps, calibrated, saved atomically, strict on bad input."""

import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats

import dn2_jax as dn2
from dn2_jax import detector as detector_module
from dn2_jax.detector import Detector, DetectorConfig
from dn2_jax.errors import DN2Error, DN2FileError


def gaussian(n, d=8, seed=0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(np.float32)


def raw_detector(**kw):
    """A features-only detector on raw (un-normalised) features."""
    return Detector(backbone="pixels", normalize=False, **kw)


def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ config


def test_config_fields_carry_help_and_defaults():
    cfg = DetectorConfig()
    assert (cfg.backbone, cfg.k, cfg.score_k(), cfg.normalize, cfg.clean, cfg.fpr, cfg.dtype) == (
        "efficientnet_lite0", None, 2, True, "none", 0.05, "float32")  # k None: the paper's 2 without cleaning
    for f in dataclasses.fields(DetectorConfig):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], f.name
    assert DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3


@pytest.mark.parametrize("field, value", [
    ("backbone", "vgg16"), ("k", 0), ("k", 2.5), ("k", True), ("fpr", 0.0), ("fpr", 1.0), ("fpr", -0.1),
    ("dtype", "float16"), ("clean", "sometimes"), ("clean_fraction", 1.0), ("clean_k", 0), ("batch_size", 0),
    ("input_size", 0), ("normalize", "yes"), ("weights", 3),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(DN2Error, match=field):
        DetectorConfig(**{field: value})


def test_unknown_setting_and_pixels_specific_errors():
    with pytest.raises(DN2Error, match="unknown detector setting.*'kk'"):
        Detector(kk=3)
    with pytest.raises(DN2Error, match="input_size"):
        Detector(backbone="pixels", input_size=32)
    with pytest.raises(DN2Error, match="config must be a DetectorConfig"):
        Detector({"k": 2})


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("normalize", [False, True])
def test_scores_equal_knn_score_and_threshold_equals_knn_threshold(normalize):
    bank, queries = gaussian(200, seed=0), gaussian(50, seed=1, shift=0.3)
    det = Detector(backbone="pixels", normalize=normalize, k=3, fpr=0.1).fit_features(bank)
    ref_bank, ref_q = (dn2.l2_normalize(bank), dn2.l2_normalize(queries)) if normalize else (bank, queries)
    scores = det.score_features(queries)
    assert scores.dtype == np.float32 and scores.shape == (50,)
    np.testing.assert_allclose(scores, np.asarray(dn2.knn_score(ref_q, ref_bank, 3)), rtol=1e-6)
    assert det.threshold == pytest.approx(float(dn2.threshold(ref_bank, 3, 0.1)), rel=1e-7)
    np.testing.assert_allclose(det.calibration_scores, np.asarray(dn2.self_knn_score(ref_bank, 3)), rtol=1e-6)
    q = det.query_features(queries)
    np.testing.assert_array_equal(q.anomalous, scores > det.threshold)
    np.testing.assert_array_equal(q.scores, scores)
    assert 0 < q.anomalous.sum() < 50  # the shifted queries straddle the threshold: the test can fail


def test_image_methods_agree_with_feature_methods():
    bank, test = images(40, seed=0), images(10, seed=1)
    det = Detector(backbone="pixels", k=2).fit(bank)
    feats = det.embed(test, raw=True)
    np.testing.assert_array_equal(feats, test.reshape(10, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(det.embed(test), np.asarray(dn2.l2_normalize(feats)))
    scores = det.score(test)
    np.testing.assert_array_equal(scores, det.score_features(feats))
    np.testing.assert_array_equal(det.decision_function(test), scores)
    np.testing.assert_array_equal(det.predict(test), scores > det.threshold)
    np.testing.assert_array_equal(det.p_values(test), det.query(test).p_values)


def test_p_values_of_held_out_normal_points_are_uniform_and_anomalies_small():
    det = raw_detector(k=2).fit_features(gaussian(4000, d=6, seed=0))
    p = det._p_values(det.score_features(gaussian(1000, d=6, seed=1)))
    assert p.min() > 0 and p.max() <= 1
    assert stats.kstest(p, "uniform").pvalue > 0.01
    far = det.query_features(gaussian(100, d=6, seed=2, shift=3.0)).p_values
    assert np.all(far < 0.01) and np.median(far) == 1 / 4001  # most beyond every calibration score
    # The definition: (1 + #{calibration >= s}) / (n + 1).
    s = det.score_features(gaussian(7, d=6, seed=3))
    expect = [(1 + np.sum(det.calibration_scores >= v)) / 4001 for v in s]
    np.testing.assert_allclose(det._p_values(s), expect)


def test_neighbours_equal_brute_force():
    bank, queries = gaussian(60, d=5, seed=0), gaussian(9, d=5, seed=1)
    ids = np.arange(1000, 1060)
    det = raw_detector(k=2).fit_features(bank, ids=ids)
    d2 = ((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :4]
    q = det.query_features(queries, k=4)
    np.testing.assert_array_equal(q.neighbours, ids[order])
    np.testing.assert_allclose(q.neighbour_sq_dists, np.take_along_axis(d2, order, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q.scores, np.take_along_axis(d2, order, 1)[:, :2].mean(1), rtol=1e-4)
    paths = [f"img{i}.png" for i in range(60)]
    det = raw_detector(k=2).fit_features(bank, paths=paths)
    assert det.query_features(queries, k=3).neighbours.tolist() == [[paths[j] for j in row[:3]] for row in order]


def test_neighbours_of_images_name_dataset_paths(tmp_path):
    root = tmp_path / "shapes"
    for split, n in (("train", 6), ("test", 3)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(images(1, seed=hash((split, c, i)) % 1000)[0]).save(root / split / c / f"{i}.png")
    train = dn2.load_dataset(f"folder:{root}", "train")
    det = Detector(backbone="pixels", k=1).fit(train)
    names, d = det.neighbours(train.images[:3], k=2)
    assert names.shape == (3, 2) and names[:, 0].tolist() == train.paths[:3]
    np.testing.assert_allclose(d[:, 0], 0, atol=1e-6)
    assert det.bank_paths == train.paths


def test_add_equals_fit_on_the_union():
    a, b, q = gaussian(50, seed=0), gaussian(30, seed=1, shift=0.2), gaussian(20, seed=2)
    for kw in ({}, {"clean": "paper", "clean_fraction": 0.2}):
        grown = raw_detector(k=2, **kw).fit_features(a).add(b)
        whole = raw_detector(k=2, **kw).fit_features(np.concatenate([a, b]))
        np.testing.assert_array_equal(grown.score_features(q), whole.score_features(q))
        np.testing.assert_array_equal(grown.calibration_scores, whole.calibration_scores)
        np.testing.assert_array_equal(grown.bank_ids, whole.bank_ids)
        assert grown.threshold == whole.threshold
    paths = [f"{i}.png" for i in range(80)]
    grown = raw_detector().fit_features(a, paths=paths[:50]).add_features(b, paths=paths[50:])
    assert grown.bank_paths == paths
    with pytest.raises(DN2Error, match="paths"):
        raw_detector().fit_features(a, paths=paths[:50]).add(b)


@pytest.mark.parametrize("rule, options", [
    ("paper", {}), ("fixed", {"clean_k": 5}), ("fixed", {"clean_k": 4, "clean_fraction": 0.3, "clean_rounds": 3}),
    ("adaptive", {"clean_k": 5}),
])
def test_cleaning_rules_keep_what_clean_bank_keeps_and_estimate_the_contamination(rule, options):
    from dn2_jax import cleaning

    bank = np.concatenate([gaussian(90, seed=0), 10 * gaussian(10, seed=1)])  # 10% scattered far away
    det = raw_detector(k=2, clean=rule, **options).fit_features(bank)
    want = cleaning.clean_bank(bank, rule, loo_k=options.get("clean_k"), fraction=options.get("clean_fraction"),
                               rounds=options.get("clean_rounds"))
    np.testing.assert_array_equal(det.bank_ids, want.keep)
    np.testing.assert_array_equal(det.bank, bank[want.keep])
    loo_k = cleaning.resolve_rule(rule, loo_k=options.get("clean_k")).loo_k
    first_round = cleaning.estimate_contamination(np.asarray(dn2.self_knn_score(bank, loo_k)))
    assert det.contamination == (want.contamination if rule == "adaptive" else first_round)
    assert det.contamination == pytest.approx(0.1, abs=0.02)
    assert np.all(det.bank_ids < 90)  # every rule dropped the ten
    assert raw_detector().fit_features(bank).contamination is None  # no cleaning, no estimate


def test_cleaning_options_are_checked_naming_them():
    with pytest.raises(DN2Error, match="clean_fraction only apply with a cleaning rule"):
        DetectorConfig(clean_fraction=0.2)
    with pytest.raises(DN2Error, match="clean_rounds must be None or a positive int"):
        DetectorConfig(clean="fixed", clean_rounds=0)
    with pytest.raises(DN2Error, match=r"clean_k=30 .* must be smaller than the bank, which has 30 images"):
        raw_detector(clean="fixed", clean_k=30).fit_features(gaussian(30))
    with pytest.raises(DN2Error, match="at least 20 rows"):
        raw_detector(clean="adaptive", clean_k=3).fit_features(gaussian(15))
    with pytest.raises(DN2Error, match="k=2 needs at least 3 bank images after cleaning"):
        raw_detector(clean="fixed", clean_k=2, clean_fraction=0.9).fit_features(gaussian(20))


def test_cleaning_keeps_what_knn_clean_keeps():
    bank = np.concatenate([gaussian(40, seed=0), 10 * gaussian(10, seed=1)])  # 10 scattered outliers
    det = raw_detector(k=2, clean="paper", clean_fraction=0.2, clean_k=3).fit_features(bank)
    kept = np.asarray(dn2.clean(bank, 3, 0.2))
    np.testing.assert_array_equal(det.bank, bank[kept])
    np.testing.assert_array_equal(det.bank_ids, kept)
    assert det.bank_size == 40 and np.all(det.bank_ids < 40)  # the outliers went
    np.testing.assert_allclose(det.calibration_scores, np.asarray(dn2.self_knn_score(bank[kept], 2)), rtol=1e-6)


# ------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    bank, q = images(30, seed=0), images(12, seed=1)
    paths = [f"bank/{i}.png" for i in range(30)]
    det = Detector(backbone="pixels", k=3, clean="paper", clean_fraction=0.1, fpr=0.2).fit(bank, paths=paths)
    out = det.save(tmp_path / "det")
    assert out == (tmp_path / "det").absolute() and (out / "detector.json").is_file()
    back = Detector.load(out)
    assert back.config == det.config
    np.testing.assert_array_equal(back.score(q), det.score(q))
    np.testing.assert_array_equal(back.calibration_scores, det.calibration_scores)
    assert back.threshold == det.threshold and back.bank_paths == det.bank_paths
    a, b = back.query(q), det.query(q)
    for f in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
    # The grown bank keeps growing after a load exactly as before it.
    extra = images(5, seed=2)
    np.testing.assert_array_equal(back.add(extra, paths=list("abcde")).score(q),
                                  det.add(extra, paths=list("abcde")).score(q))
    assert sorted(os.listdir(tmp_path)) == ["det"]  # no temporaries left


@pytest.mark.slow
def test_save_load_keeps_the_contamination_estimate_and_reads_format_1(tmp_path):
    bank = gaussian(40, seed=3)
    det = raw_detector(clean="fixed", clean_k=5).fit_features(bank)
    assert det.contamination is not None
    back = Detector.load(det.save(tmp_path / "det"))
    assert back.contamination == det.contamination and back.config == det.config
    # A detector saved by format 1 (clean_fraction 0.5 even without cleaning; paper's clean_k None meant k).
    for clean, want in (("none", dict(clean_fraction=None, clean_k=None)), ("paper", dict(clean_k=3))):
        saved = raw_detector(k=3).fit_features(bank).save(tmp_path / clean)
        manifest = json.loads((saved / "detector.json").read_text())
        manifest["format_version"] = 1
        del manifest["contamination"], manifest["config"]["clean_rounds"]
        manifest["config"].update(clean=clean, clean_fraction=0.5, clean_k=None)
        (saved / "detector.json").write_text(json.dumps(manifest))
        old = Detector.load(saved)
        assert old.contamination is None and old.config.clean == clean
        assert {name: getattr(old.config, name) for name in want} == want
        np.testing.assert_array_equal(old.score_features(bank[:5]), raw_detector(k=3).fit_features(bank)
                                      .score_features(bank[:5]))


def test_load_overrides_k_recomputes_calibration_and_refuses_feature_settings(tmp_path):
    bank = gaussian(40)
    raw_detector(k=2).fit_features(bank).save(tmp_path / "det")
    assert Detector.saved_config(tmp_path / "det") == DetectorConfig(backbone="pixels", normalize=False, k=2)
    at5 = Detector.load(tmp_path / "det", k=5, fpr=0.2)
    fresh = raw_detector(k=5, fpr=0.2).fit_features(bank)
    np.testing.assert_array_equal(at5.calibration_scores, fresh.calibration_scores)
    assert at5.threshold == fresh.threshold
    with pytest.raises(DN2Error, match="normalize cannot change"):
        Detector.load(tmp_path / "det", normalize=True)
    with pytest.raises(DN2Error, match="k=40 needs"):
        Detector.load(tmp_path / "det", k=40)


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory):
    """Two random resnet18 weight directories (different fingerprints); no forward pass needed."""
    root = tmp_path_factory.mktemp("weights")
    out = []
    for seed in (0, 1):
        variables = dn2.init_random_variables("resnet18", seed=seed)
        out.append(str(dn2.save_variables(variables, root / f"r18-{seed}", {"backbone": "resnet18",
                                                                           "fingerprint": dn2.fingerprint(variables)})))
    return out


def test_load_refuses_weights_of_another_fingerprint(tmp_path, two_weights):
    w0, w1 = two_weights
    det = Detector(backbone="resnet18", weights=w0, normalize=False).fit_features(gaussian(10, d=512))
    det.save(tmp_path / "det")
    assert Detector.load(tmp_path / "det").fingerprint == det.fingerprint
    with pytest.raises(DN2Error, match=r"fitted with resnet18 weights of fingerprint .*resolves to fingerprint"):
        Detector.load(tmp_path / "det", weights=w1)
    with pytest.raises(DN2Error, match="features have dim 8, backbone resnet18 has dim 512"):
        Detector(backbone="resnet18", weights=w0).fit_features(gaussian(10, d=8))


def test_save_is_atomic(tmp_path, monkeypatch):
    det = raw_detector().fit_features(gaussian(20))

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(detector_module, "_write_manifest", boom)  # fails after both stores are written
    with pytest.raises(OSError, match="disk full"):
        det.save(tmp_path / "det")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    det.save(tmp_path / "det")
    before = (tmp_path / "det" / "detector.json").read_text()
    monkeypatch.setattr(detector_module, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        raw_detector(k=3).fit_features(gaussian(20, seed=5)).save(tmp_path / "det", overwrite=True)
    assert os.listdir(tmp_path) == ["det"] and (tmp_path / "det" / "detector.json").read_text() == before
    monkeypatch.undo()
    raw_detector(k=3).fit_features(gaussian(20, seed=5)).save(tmp_path / "det", overwrite=True)
    assert Detector.load(tmp_path / "det").config.k == 3 and os.listdir(tmp_path) == ["det"]


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_one_clear_error(tmp_path):
    det = raw_detector(k=2)
    with pytest.raises(DN2Error, match="not fitted"):
        det.score_features(gaussian(3))
    with pytest.raises(DN2Error, match="not fitted"):
        det.save(tmp_path / "x")
    with pytest.raises(DN2Error, match=r"k=2 needs a bank of at least 3 images"):
        det.fit_features(gaussian(2))
    with pytest.raises(DN2Error, match="features is empty"):
        det.fit_features(np.zeros((0, 8), np.float32))
    with pytest.raises(DN2Error, match="non-finite"):
        det.fit_features(np.full((5, 8), np.nan, np.float32))
    assert not det.is_fitted  # failed fits leave nothing behind
    det.fit_features(gaussian(10))
    with pytest.raises(DN2Error, match="features have dim 7, the bank has dim 8"):
        det.score_features(gaussian(3, d=7))
    with pytest.raises(DN2Error, match=r"k must be an int in \[1, 10\]"):
        det.query_features(gaussian(3), k=11)
    with pytest.raises(DN2Error, match="ids must be 10 integers"):
        raw_detector().fit_features(gaussian(10), ids=np.arange(9))
    with pytest.raises(DN2Error, match="paths must be 10 strings"):
        raw_detector().fit_features(gaussian(10), paths=["a"] * 9)
    pix = Detector(backbone="pixels")
    with pytest.raises(DN2Error, match="images is empty"):
        pix.fit(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DN2Error, match="images is empty"):
        pix.fit([])
    with pytest.raises(DN2Error, match="uint8"):
        pix.fit(images(5).astype(np.float32).reshape(5, 8, 8, 3))
    with pytest.raises(DN2Error, match="fit_features"):
        pix.fit(gaussian(5))
    with pytest.raises(DN2Error, match="one size"):
        pix.fit([images(1, size=8)[0], images(1, size=9)[0]])
    pix.fit(images(5))
    with pytest.raises(DN2Error, match="dim 243, the bank has dim 192"):
        pix.score(images(2, size=9))
    det.save(tmp_path / "det")
    with pytest.raises(DN2Error, match="already exists"):
        det.save(tmp_path / "det")
    (tmp_path / "other").mkdir()
    with pytest.raises(DN2Error, match="not a saved detector"):
        det.save(tmp_path / "other", overwrite=True)
    with pytest.raises(DN2FileError, match="not a saved detector"):
        Detector.load(tmp_path / "other")
    with pytest.raises(DN2FileError, match="does not exist"):
        Detector.load(tmp_path / "missing")
    manifest = json.loads((tmp_path / "det" / "detector.json").read_text())
    (tmp_path / "det" / "detector.json").write_text(json.dumps({**manifest, "identity": {
        **manifest["identity"], "preset": "pixels/256"}}))
    with pytest.raises(DN2Error, match="other features.*preset: saved 'pixels/256', now 'pixels/255'"):
        Detector.load(tmp_path / "det")
    (tmp_path / "det" / "detector.json").write_text(json.dumps(manifest))
    os.remove(tmp_path / "det" / "bank" / "manifest.json")
    with pytest.raises(DN2FileError, match="damaged.*bank"):
        Detector.load(tmp_path / "det")
    (tmp_path / "det" / "detector.json").write_text("{")
    with pytest.raises(DN2FileError, match="damaged"):
        Detector.load(tmp_path / "det")


# ------------------------------------------------------------------------------------------ stores


def test_fit_from_a_store_equals_fit_on_images_and_refuses_other_features(tmp_path):
    bank, q = images(20, seed=0), images(6, seed=1)
    det = Detector(backbone="pixels", k=2)
    meta = {**det.identity, "dataset": "toy", "split": "train"}
    st = dn2.extract_to_store(tmp_path / "store", bank, det.embed_fn, metadata=meta, ids=np.arange(100, 120),
                              progress=False)
    from_store = Detector(backbone="pixels", k=2).fit(st)
    from_path = Detector(backbone="pixels", k=2).fit(str(tmp_path / "store"))
    from_images = Detector(backbone="pixels", k=2).fit(bank, ids=np.arange(100, 120))
    for d in (from_store, from_path):
        np.testing.assert_array_equal(d.score(q), from_images.score(q))
        np.testing.assert_array_equal(d.bank_ids, np.arange(100, 120))
    other = {**meta, "backbone": "resnet18", "fingerprint": "abc"}
    dn2.write_store(tmp_path / "other", np.ones((5, 192), np.float32), metadata=other)
    with pytest.raises(DN2Error, match=r"not made with this detector's features: backbone: store has 'resnet18', "
                                       r"detector 'pixels'"):
        Detector(backbone="pixels").fit(tmp_path / "other")


# ------------------------------------------------------------------------------------------ = dn2 eval


def _write_folder(root, sizes):
    """folder:ROOT with classes 'dots' and 'stripes' (train and test); images of the given sizes in turn."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 8)):
        for c, kind in enumerate(("dots", "stripes")):
            (root / split / kind).mkdir(parents=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                img = rng.normal(100, 20, (h, w, 3))
                if c:
                    img[:, :: 4] += 80
                else:
                    img[rng.integers(0, h, 6), rng.integers(0, w, 6)] = 250
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / kind / f"{i}.png")


def _auc_of_detector(det, dataset, normal_class):
    train, test = dn2.load_dataset(dataset, "train"), dn2.load_dataset(dataset, "test")
    bank = np.flatnonzero(train.labels == normal_class)
    det.fit([train.images[i] for i in bank] if isinstance(train.images, list) else train.images[bank])
    return float(dn2.roc_auc(det.score(test.images), (test.labels != normal_class).astype(np.int64)))


def test_detector_auc_equals_dn2_eval_pixels(tmp_path):
    _write_folder(tmp_path / "f", [(12, 12)])
    dataset = f"folder:{tmp_path / 'f'}"
    for c in (0, 1):
        res, _ = dn2.evaluate(dn2.EvalConfig(dataset=dataset, backbone="pixels", classes=(c,)), printer=None)
        auc = _auc_of_detector(Detector(backbone="pixels"), dataset, c)
        assert abs(auc - res["mean"]) <= 1e-6 and 0.5 < auc  # the classes differ: AUC above chance


@pytest.mark.slow
def test_detector_auc_equals_dn2_eval_backbone_on_mixed_sizes(tmp_path, caplog):
    _write_folder(tmp_path / "f", [(40, 40), (36, 44)])
    dataset = f"folder:{tmp_path / 'f'}"
    assert not dn2.load_dataset(dataset, "train").images.uniform  # mixed sizes: grouped by shape
    kw = dict(backbone="efficientnet_lite0", input_size=32, batch_size=8)
    res, _ = dn2.evaluate(dn2.EvalConfig(dataset=dataset, classes=(1,), **kw), printer=None)
    det = Detector(**kw)
    auc = _auc_of_detector(det, dataset, 1)
    assert abs(auc - res["mean"]) <= 1e-6
    # One jitted embedding per detector: scoring the same images again compiles nothing, and image shapes seen
    # once never compile the backbone again, whatever the number of images.
    test = dn2.load_dataset(dataset, "test")
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        det.score(test.images)
        assert _compiled(caplog) == []
        det.embed(test.images[:5] + test.images[-4:], raw=True)
        jax.jit(_probe)(np.ones(3))  # the log capture works: a new function is seen
    names = _compiled(caplog)
    # EmbedFn.stream slices the padded last batch on device, a tiny jit(dynamic_slice) per new batch count;
    # the backbone forward is not among the compiled functions.
    assert "_probe" in names and set(names) - {"_probe"} <= {"dynamic_slice"}


def _probe(x):
    return x * 3


def _compiled(caplog):
    """Names of the functions jax compiled (from jax_log_compiles records)."""
    return [m.group(1) for r in caplog.records if (m := re.match(r"Compiling jit\((\w+)\)", r.getMessage()))]
