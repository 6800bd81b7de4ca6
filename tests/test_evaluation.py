"""dn2_jax.evaluation: results against an independent computation, and cached features of mixed-size images."""

import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dn2_jax import protocols, store
from dn2_jax.data import Dataset, load_dataset
from dn2_jax.evaluation import EvalConfig, FeatureExtractor, evaluate

faiss = pytest.importorskip("faiss")  # the `test` extra installs faiss-cpu


def _independent_auc(train, test, c, *, bank_size, test_size, k, normalize):
    """DN2 ROC-AUC from raw pixels with faiss exact L2 search and sklearn: no dn2_jax kNN or metric code."""
    split = protocols.one_class(train.labels, test.labels, c, bank_size=bank_size, test_size=test_size)

    def feats(ds, idx):
        x = ds.images[idx].reshape(len(idx), -1).astype(np.float32) / 255.0
        return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x

    index = faiss.IndexFlatL2(train.images[0].size)
    index.add(feats(train, split.bank))
    sq_dists, _ = index.search(feats(test, split.test), k)
    return roc_auc_score(split.test_anomaly, sq_dists.mean(1))


@pytest.mark.parametrize("normalize", [True, False])
def test_evaluate_matches_faiss_and_sklearn(normalize):
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    cfg = EvalConfig(backbone="pixels", classes=(0, 7), bank_size=60, test_size=300, k=3, normalize=normalize)
    res, per_class = evaluate(cfg, printer=None)
    for c, r in zip((0, 7), per_class, strict=True):
        want = _independent_auc(train, test, c, bank_size=60, test_size=300, k=3, normalize=normalize)
        assert r.auc == pytest.approx(want, abs=1e-6)
        assert res["per_class"][train.class_names[c]] == r.auc
    assert 0.5 < res["mean"] < 1.0


class _FakeDetector:
    """Duck-typed detector: features = (mean of each channel, height, width), counting the batches it sees."""

    def __init__(self, fail_after=None):
        self.config = types.SimpleNamespace(backbone="fake", dtype="float32", batch_size=2)
        self.identity = {"backbone": "fake", "fingerprint": "f" * 64, "preset": "none"}
        self.batches, self.fail_after = [], fail_after

    def embed(self, images, raw=False):
        shapes = {im.shape for im in images}
        self.batches.append(shapes)
        if self.fail_after is not None and len(self.batches) > self.fail_after:
            raise KeyboardInterrupt  # an interruption in the middle of the extraction
        return np.asarray([[*im.reshape(-1, 3).mean(0), *im.shape[:2]] for im in images], np.float32)


def _mixed_dataset(n=13):
    rng = np.random.default_rng(0)
    sizes = [(8, 8), (6, 10), (12, 5)]
    images = [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(n)]
    return Dataset("fake:mixed", "train", images, np.arange(n) % 2, ["a", "b"])


def test_mixed_sizes_store_is_bucketed_by_shape_and_resumes_bit_identical(tmp_path):
    ds = _mixed_dataset()
    idx = np.arange(1, 13)
    whole = FeatureExtractor(_FakeDetector()).to_store(tmp_path / "whole", ds, idx, chunk_size=4)
    broken = FeatureExtractor(_FakeDetector(fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        broken.to_store(tmp_path / "resumed", ds, idx, chunk_size=4)
    with pytest.raises(store.IncompleteStoreError):
        store.open_store(tmp_path / "resumed")
    resumer = FeatureExtractor(_FakeDetector())
    resumed = resumer.to_store(tmp_path / "resumed", ds, idx, chunk_size=4)
    assert len(resumer.detector.batches) < 6  # only the chunks that were not committed are embedded again
    np.testing.assert_array_equal(resumed.embeddings(), whole.embeddings())
    np.testing.assert_array_equal(resumed.ids, whole.ids)
    assert sorted(whole.ids) == list(idx)
    # rows are grouped by shape, so at most (number of shapes - 1) batches mix two shapes
    shapes = [tuple(whole.embeddings()[i, 3:].astype(int)) for i in range(whole.count)]
    assert sum(a != b for a, b in zip(shapes[:-1], shapes[1:], strict=True)) == 2
    # each row is the features of the image its id names
    for row, i in zip(whole.embeddings(), whole.ids, strict=True):
        np.testing.assert_allclose(row[3:], ds.images[i].shape[:2])


def test_cached_features_of_mixed_sizes_come_back_in_request_order(tmp_path):
    ds = _mixed_dataset()
    extract = FeatureExtractor(_FakeDetector(), cache_dir=tmp_path)
    want = np.asarray([[*im.reshape(-1, 3).mean(0), *im.shape[:2]] for im in ds.images], np.float32)
    np.testing.assert_array_equal(extract(ds, np.arange(13)), want)
    n_batches = len(extract.detector.batches)
    subset = np.array([2, 5, 11])
    np.testing.assert_array_equal(extract(ds, subset), want[subset])  # served from the cached store
    assert len(extract.detector.batches) == n_batches


def _pixels(ds, idx):
    x = ds.images[np.asarray(idx)].reshape(*np.shape(idx), -1).astype(np.float32) / 255.0
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _faiss_scores(bank, queries, k):
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), k)[0].mean(1)


@pytest.mark.slow
def test_unsupervised_reports_chosen_paper_and_no_cleaning_against_faiss_and_sklearn():
    import dn2_jax as dn2
    from dn2_jax import cleaning

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    cfg = EvalConfig(backbone="pixels", mode="unsupervised", classes=(3,), bank_size=60, test_size=200, k=2,
                     contamination=0.2, clean="fixed", clean_k=8, clean_fraction=0.35, clean_rounds=2)
    res, (r,) = evaluate(cfg, printer=None)
    b = protocols.contaminated_bank(train.labels, 3, 0.2, bank_size=60, n_classes=10, seed=0)
    t = protocols.one_class(train.labels, test.labels, 3, test_size=200, bank_size=1, n_classes=10, seed=0)
    bank, queries = _pixels(train, b.bank), _pixels(test, t.test)
    kept = {"none": np.arange(60), "paper": np.asarray(dn2.clean(bank, 2, 0.5)),
            "fixed": cleaning.clean_bank(bank, "fixed", loo_k=8, fraction=0.35, rounds=2).keep}
    auc = {rule: roc_auc_score(t.test_anomaly, _faiss_scores(bank[rows], queries, 2)) for rule, rows in kept.items()}
    assert r.auc == pytest.approx(auc["fixed"], abs=1e-6)
    assert res["extra"]["auc_paper_cleaning"]["mean"] == pytest.approx(auc["paper"], abs=1e-6)
    assert res["extra"]["auc_without_cleaning"]["mean"] == pytest.approx(auc["none"], abs=1e-6)
    assert res["extra"]["contaminants"]["mean"] == 12
    assert res["extra"]["contaminants_after_paper_cleaning"]["mean"] == b.contaminant[kept["paper"]].sum()
    assert res["extra"]["contaminants_after_cleaning"]["mean"] == b.contaminant[kept["fixed"]].sum()
    assert res["extra"]["bank_after_cleaning"]["mean"] == len(kept["fixed"]) == 60 - 21
    first = np.asarray(dn2.self_knn_score(bank, 8))
    assert res["extra"]["contamination_estimated"]["mean"] == pytest.approx(cleaning.estimate_contamination(first))
    assert res["extra"]["contamination"]["mean"] == pytest.approx(0.2)


@pytest.mark.slow
def test_unsupervised_default_scores_with_the_rules_share_of_the_cleaned_bank():
    from dn2_jax import cleaning

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    cfg = EvalConfig(backbone="pixels", mode="unsupervised", classes=(1,), bank_size=1100, test_size=300,
                     contamination=0.1)  # default rule and k
    res, (r,) = evaluate(cfg, printer=None)
    b = protocols.contaminated_bank(train.labels, 1, 0.1, bank_size=1100, n_classes=10, seed=0)
    t = protocols.one_class(train.labels, test.labels, 1, test_size=300, bank_size=1, n_classes=10, seed=0)
    bank, queries = _pixels(train, b.bank), _pixels(test, t.test)
    settings = cleaning.resolve_rule(cleaning.DEFAULT_CLEAN)
    kept = cleaning.clean_bank(bank, cleaning.DEFAULT_CLEAN).keep
    k = settings.score_k_for(len(kept))
    assert k == max(2, round(settings.score_share * len(kept))) > 2  # 715 kept rows: k = 4
    assert res["extra"]["k"]["mean"] == k and res["k"] is None
    assert r.auc == pytest.approx(roc_auc_score(t.test_anomaly, _faiss_scores(bank[kept], queries, k)), abs=1e-6)
    # the paper's column keeps the paper's k = 2
    paper = np.asarray(cleaning.clean_bank(bank, "paper").keep)
    assert res["extra"]["auc_paper_cleaning"]["mean"] == pytest.approx(
        roc_auc_score(t.test_anomaly, _faiss_scores(bank[paper], queries, 2)), abs=1e-6)


@pytest.mark.slow
def test_group_comp_pool_is_fitted_on_normal_train_sets_and_scores_with_a_share_of_them():
    from dn2_jax.pooling import fit_set_pool

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    cfg = EvalConfig(backbone="pixels", mode="group", classes=(5,), group_size=3, train_groups=100, test_groups=40,
                     group_pool="comp", seed=2)
    res, (r,) = evaluate(cfg, printer=None)
    train_sets, groups = protocols.train_test_groups(train.labels, test.labels, [5, 6, 7], 100, 20, 20, seed=7)
    images = np.unique(train_sets)
    tr, te = _pixels(train, images), _pixels(test, groups.sets)
    tr_sets = np.searchsorted(images, train_sets)
    pool = fit_set_pool(tr, "comp", sets=tr_sets, seed=2)
    flat_te = te.reshape(-1, te.shape[-1])
    k = pool.score_k(100)
    scores = _faiss_scores(np.asarray(pool(tr, tr_sets)), np.asarray(pool(flat_te, np.arange(len(flat_te)).reshape(
        groups.sets.shape))), k)
    assert k == 5 and res["extra"]["k"]["mean"] == 5
    assert r.auc == pytest.approx(roc_auc_score(groups.anomaly, scores), abs=1e-6)


@pytest.mark.slow
def test_group_pool_is_fitted_on_normal_train_images_and_reported_beside_mean_and_pointwise():
    from dn2_jax.pooling import fit_set_pool

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    cfg = EvalConfig(backbone="pixels", mode="group", classes=(2,), group_size=3, train_groups=40, test_groups=30,
                     group_pool="mean+hist", prototypes=6, k=3, seed=1)
    res, (r,) = evaluate(cfg, printer=None)
    train_sets, groups = protocols.train_test_groups(train.labels, test.labels, [2, 3, 4], 40, 15, 15, seed=3)
    images = np.unique(train_sets)  # the normal train images, the only ones the pool sees
    tr, te = _pixels(train, images), _pixels(test, groups.sets)  # (n, D), (G, M, D)
    tr_sets = np.searchsorted(images, train_sets)
    want = {}
    for name in ("mean+hist", "mean"):
        pool = fit_set_pool(tr, name, prototypes=6, seed=1)
        flat_te = te.reshape(-1, te.shape[-1])
        te_sets = np.arange(len(flat_te)).reshape(groups.sets.shape)
        scores = _faiss_scores(np.asarray(pool(tr, tr_sets)), np.asarray(pool(flat_te, te_sets)), 3)
        want[name] = roc_auc_score(groups.anomaly, scores)
    pointwise = _faiss_scores(tr, te.reshape(-1, te.shape[-1]), 3).reshape(groups.sets.shape).mean(1)
    assert r.auc == pytest.approx(want["mean+hist"], abs=1e-6)
    assert res["extra"]["auc_mean_pool"]["mean"] == pytest.approx(want["mean"], abs=1e-6)
    assert res["extra"]["auc_pointwise"]["mean"] == pytest.approx(roc_auc_score(groups.anomaly, pointwise), abs=1e-6)
    assert want["mean+hist"] > want["mean"] + 0.02  # the two pools are told apart (0.72 vs 0.68)


def test_cached_features_of_a_folder_follow_its_files(tmp_path):
    """A store's ids index the folder's files: a file added later (shifting the indices) or a file skipped as
    undecodable must not be served the features cached for another file."""
    from PIL import Image

    from dn2_jax.data import clear_cache

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i, value in enumerate((10, 100, 200)):
        Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(root / "a" / f"{i}.png")
    extract = FeatureExtractor(_FakeDetector(), cache_dir=tmp_path / "cache")
    first = extract(load_dataset(f"folder:{root}", "all"), np.arange(3))
    np.testing.assert_array_equal(first[:, 0], [10, 100, 200])
    Image.fromarray(np.full((6, 6, 3), 50, np.uint8)).save(root / "a" / "0a.png")  # sorts between 0 and 1
    clear_cache()
    ds = load_dataset(f"folder:{root}", "all")
    np.testing.assert_array_equal(extract(ds, np.arange(4))[:, 0], [10, 50, 100, 200])
    (root / "a" / "1.png").write_bytes(b"broken")
    clear_cache()
    ds = load_dataset(f"folder:{root}", "all", on_error="skip")
    np.testing.assert_array_equal(extract(ds, np.arange(3))[:, 0], [10, 50, 200])
