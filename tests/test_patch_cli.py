"""`dn2 eval/fit --level patch` and `dn2 score --maps` end to end on synthetic defects with exact masks
(dn2_jax.synthetic, MVTec layout), against the library path (make_patch_fn + build_bank + score_patch_images,
as scripts/patch_synthetic.py); the patch-level Detector's save/load and patch store; bad inputs."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dn2_jax.cli import main
from dn2_jax.errors import DN2Error

LAYERS = ("stage2", "stage3")
# input 32: stage2 is the 8x8 patch grid (64 dims with stage3); sigma 2 px for the 32x32 maps
PATCH = ["--level", "patch", "--layers", ",".join(LAYERS), "--input-size", "32", "--coreset", "0.5", "--sigma", "2",
         "--batch-size", "8"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from dn2_jax.synthetic import write_synthetic_mvtec

    return write_synthetic_mvtec(tmp_path_factory.mktemp("syn") / "weave", n_train=6, n_test_good=3,
                                 n_test_defect=2, size=40, seed=2)


@pytest.fixture(scope="module")
def library(synthetic):
    """The library path on the same folder: image scores, maps in the model frame, frame masks, labels."""
    from dn2_jax.convert import load_variables
    from dn2_jax.data import load_mvtec
    from dn2_jax.patch import PatchConfig, build_bank, make_patch_fn, score_patch_images, to_model_frame
    from dn2_jax.pixel_metrics import load_mvtec_masks

    variables = load_variables("efficientnet_lite0")
    cfg = PatchConfig(layers=LAYERS, input_size=32, coreset=0.5, sigma=2.0, k=2)  # k: the dn2 default
    train, test = load_mvtec(str(synthetic), "train"), load_mvtec(str(synthetic), "test")
    fn = make_patch_fn("efficientnet_lite0", variables, cfg, batch_size=8)
    bank = build_bank(fn(train.images), cfg)
    res = score_patch_images(test.images, bank, "efficientnet_lite0", variables, cfg, patch_fn=fn)
    masks = to_model_frame(load_mvtec_masks(test.paths, test.defect_types).astype(np.uint8), fn.preset, masks=True)
    return {"res": res, "masks": masks, "labels": test.labels, "paths": test.paths, "bank": bank}


@pytest.mark.slow
def test_eval_gives_the_library_image_and_pixel_metrics(capsys, tmp_path, synthetic, library):
    from dn2_jax.metrics import roc_auc
    from dn2_jax.pixel_metrics import aupro, pixel_roc_auc

    out = tmp_path / "run"
    code, stdout, err = run(capsys, "eval", "--dataset", f"mvtec:{synthetic}", *PATCH, "--out", out, "--no-cache")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    lib = library["res"]
    assert res["per_class"]["weave"] == pytest.approx(float(roc_auc(lib.image_scores, library["labels"])), abs=1e-6)
    assert res["extra"]["pixel_auc"]["per_class"]["weave"] == pytest.approx(
        pixel_roc_auc(lib.maps, library["masks"]), abs=1e-6)
    assert res["extra"]["aupro"]["per_class"]["weave"] == pytest.approx(aupro(lib.maps, library["masks"]), abs=1e-6)
    assert res["extra"]["bank_patches"]["per_class"]["weave"] == len(library["bank"]) == 6 * 64 // 2
    assert res["settings"]["level"] == "patch" and res["settings"]["layers"] == list(LAYERS)
    assert res["per_class"]["weave"] > 0.5 and res["extra"]["pixel_auc"]["per_class"]["weave"] > 0.7
    assert (out / "maps.png").stat().st_size > 5000 and "wrote" in stdout and "maps.png" in stdout


@pytest.mark.slow
def test_fit_and_score_maps_write_one_png_per_image_with_the_eval_scores(capsys, tmp_path, synthetic, library):
    det, maps, scores = tmp_path / "det", tmp_path / "maps", tmp_path / "scores.json"
    code, stdout, err = run(capsys, "fit", "--images", synthetic / "train" / "good", *PATCH, "--out", det)
    assert code == 0, err
    assert "patch bank of 192 patches from 6 normal images (8x8 patches of 64 dims" in stdout
    assert not list(tmp_path.glob(".*patches*"))  # the resumable patch store is removed once det is written
    code, stdout, err = run(capsys, "score", det, "--images", synthetic / "test", "--maps", maps, "--out", scores)
    assert code == 0, err
    rows = json.loads(scores.read_text())["scores"]
    pngs = sorted(p.name for p in maps.iterdir())
    assert len(pngs) == len(rows) == 7 and all(p.endswith(".png") for p in pngs)
    assert pngs[0] == "0000_blob_000.png" and all((maps / p).stat().st_size > 1000 for p in pngs)
    by_path = {r["id"]: r["score"] for r in rows}  # score names rows by path; load_mvtec orders differently
    got = np.array([by_path[str(p)] for p in library["paths"]])
    np.testing.assert_allclose(got, library["res"].image_scores, rtol=1e-5)
    assert all(0 < r["p_value"] <= 1 and "/train/good/" in r["neighbours"][0]["id"] for r in rows)


@pytest.mark.slow
def test_patch_detector_store_save_load_and_leave_one_image_out(tmp_path, monkeypatch, synthetic, library):
    from dn2_jax import patch_detector
    from dn2_jax.data import load_mvtec
    from dn2_jax.detector import Detector
    from dn2_jax.patch_detector import PatchDetector

    train, test = load_mvtec(str(synthetic), "train"), load_mvtec(str(synthetic), "test")
    cfg = dict(level="patch", layers=LAYERS, input_size=32, coreset=0.5, sigma=2.0, batch_size=8)
    det = Detector(**cfg).fit(train.images, patch_store=tmp_path / "patches")
    assert isinstance(det, PatchDetector) and det.bank_size == 192 and det.images == 6
    np.testing.assert_allclose(det.bank, library["bank"], rtol=1e-6)  # the coreset picks the store's rows
    in_memory = Detector(**cfg).share_features(det).fit(train.images)
    np.testing.assert_array_equal(in_memory.calibration_scores, det.calibration_scores)
    # leave one image out: image 0 scored against a bank of the other images' patches only
    fn, bank = det.patch_fn, det.bank
    own = det.bank_ids == 0
    patches = fn(train.images[:1]).reshape(-1, bank.shape[1])
    d = ((patches[:, None, :] - bank[None, ~own]) ** 2).sum(-1)
    brute = np.sqrt(np.sort(d, axis=1)[:, :2].mean(1)).max()
    assert det.calibration_scores[0] == pytest.approx(brute, rel=1e-4)
    # a bank over MEMORY_BYTES is selected by the streamed coreset over the store's chunks and gathered from
    # them; with oversample * fraction >= 1 (here 4 * 0.5) the stream keeps every row, so the banks are equal
    monkeypatch.setattr(patch_detector, "MEMORY_BYTES", 0)
    streamed = Detector(**cfg).share_features(det).fit(train.images, patch_store=tmp_path / "patches")
    np.testing.assert_array_equal(streamed.bank, det.bank)
    np.testing.assert_array_equal(streamed.bank_ids, det.bank_ids)
    det.save(tmp_path / "det")
    back = Detector.load(tmp_path / "det")
    assert isinstance(back, PatchDetector) and back.threshold == det.threshold
    np.testing.assert_allclose(back.score(test.images), det.score(test.images), rtol=1e-6)
    with pytest.raises(DN2Error, match="k cannot change"):
        Detector.load(tmp_path / "det", k=3)


def _damage(root, tmp_path, how):
    copy = tmp_path / "weave"
    shutil.copytree(root, copy)
    mask = copy / "ground_truth" / "blob" / "001_mask.png"
    if how == "missing":
        mask.unlink()
    else:
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(mask)
    return copy


@pytest.mark.parametrize("how,match", [("missing", "001_mask.png does not exist"),
                                       ("mis-sized", "001_mask.png is 20x20 px but its image")])
def test_eval_refuses_missing_or_mis_sized_masks_before_writing(capsys, tmp_path, synthetic, how, match):
    root = _damage(synthetic, tmp_path, how)
    out = tmp_path / "run"
    code, _, err = run(capsys, "eval", "--dataset", f"mvtec:{root}", *PATCH, "--out", out, "--no-cache")
    assert code == 2 and err.startswith("dn2: error:") and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def pixel_detector(tmp_path_factory, synthetic):
    det = tmp_path_factory.mktemp("pix") / "det"
    assert main(["fit", "--images", str(synthetic / "train" / "good"), "--backbone", "pixels", "--out", str(det)]) == 0
    return det


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    for i in range(3):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "--dataset", "mvtec:{syn}", *PATCH, "--layers", "stage2,stage9"],
         "unknown patch layer(s) stage9 for backbone efficientnet_lite0; available:"),
        (["eval", "--dataset", "mvtec:{syn}", *PATCH, "--coreset", "0"], "coreset fraction must be in (0, 1], got 0"),
        (["eval", "--dataset", "mvtec:{syn}", *PATCH, "--coreset", "1.5"], "coreset fraction must be in (0, 1]"),
        (["eval", "--dataset", "mvtec:{syn}", "--coreset", "0.5"], "--coreset applies to --level patch only"),
        (["eval", "--dataset", "mvtec:{syn}", "--level", "patch", "--backbone", "pixels"],
         "level 'patch' needs a network backbone"),
        (["eval", "--mode", "unsupervised", "--level", "patch"], "--level applies to --mode semi"),
        (["eval", "--dataset", "mvtec:{syn}", "--level", "patch", "--no-normalize"], "--normalize applies to --level"),
        (["fit", "--images", "{tiny}", *PATCH, "--out", "{tmp}/d"], "6x6 px, smaller than the patch grid (8x8"),
        (["fit", "--store", "{pix}/bank", "--level", "patch", "--out", "{tmp}/d"], "--level patch needs the images"),
        (["fit", "--images", "{syn}/train/good", "--level", "patch", "--pool", "2", "--out", "{tmp}/d"],
         "pool must be a positive odd window size"),
        (["score", "{pix}", "--images", "{syn}/test", "--maps", "{tmp}/maps"], "--maps needs a patch-level detector"),
        (["score", "{pix}", "--images", "{syn}/test", "--maps", "{pix}"], "--maps needs a patch-level detector"),
    ],
)
def test_patch_mistakes_exit_with_one_line_and_nothing_written(capsys, tmp_path, synthetic, pixel_detector,
                                                               tiny_images, argv, match):
    before = sorted(pixel_detector.rglob("*"))
    argv = [a.format(syn=synthetic, pix=pixel_detector, tiny=tiny_images, tmp=tmp_path) for a in argv]
    extra = ["--out", tmp_path / "run", "--no-cache"] if argv[0] == "eval" else []
    code, _, err = run(capsys, *argv, *extra)
    assert code == 2
    assert err.startswith("dn2: error:") and match in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [] and sorted(pixel_detector.rglob("*")) == before
