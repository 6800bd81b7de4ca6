"""Patch features (layers, aggregation, grid, projection), patch/image scores, anomaly maps, overlays."""

import numpy as np
import pytest

from dn2_jax import patch
from dn2_jax.errors import DN2Error
from dn2_jax.models import init_random_variables
from dn2_jax.preprocessing import get_preset


@pytest.fixture(scope="module")
def lite():
    return init_random_variables("efficientnet_lite0", seed=0)


def _images(n, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_patch_fn_shapes_projection_and_batching(lite):
    cfg = patch.PatchConfig(layers=("stage2", "stage3"), input_size=48)
    fn = patch.make_patch_fn("efficientnet_lite0", lite, cfg, batch_size=4)
    assert fn.layer_shapes == {"stage2": (12, 12, 24), "stage3": (6, 6, 40)}
    assert (fn.grid, fn.feature_dim) == (12, 64)
    x = _images(5)
    feats = fn(x)
    assert feats.shape == (5, 12, 12, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(fn(x[3:4])[0], feats[3], rtol=1e-5, atol=1e-5)  # batch padding changes nothing
    proj = patch.make_patch_fn("efficientnet_lite0", lite, patch.PatchConfig(
        layers=("stage2", "stage3"), input_size=48, proj_dim=16, grid=8), batch_size=4)
    assert proj(x[:2]).shape == (2, 8, 8, 16)
    with pytest.raises(DN2Error, match="empty"):  # like embed: an empty batch is a mistake
        fn(x[:0])


def test_unknown_layer_and_too_small_input_raise(lite):
    with pytest.raises(DN2Error, match=r"unknown patch layer\(s\) stage9.*available: pre_pool, stage1, stage2"):
        patch.make_patch_fn("efficientnet_lite0", lite, patch.PatchConfig(layers=("stage2", "stage9"), input_size=32))
    with pytest.raises(DN2Error, match="smaller than the patch grid"):
        patch.make_patch_fn("efficientnet_lite0", lite, patch.PatchConfig(layers=("stage2",), input_size=32, grid=40))
    with pytest.raises(DN2Error, match="pool"):
        patch.PatchConfig(pool=2)
    with pytest.raises(DN2Error, match="coreset fraction"):
        patch.PatchConfig(coreset=1.5)
    with pytest.raises(DN2Error, match="reduce"):
        patch.PatchConfig(reduce="mean")
    assert patch.default_layers("resnet18") == ("stage2", "stage3")


def test_aggregate_patches_pool_resize_concat():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    b = np.full((2, 3, 3, 2), 5.0, np.float32)
    out = np.asarray(patch.aggregate_patches([a, b], pool=3, grid=6))
    assert out.shape == (2, 6, 6, 5)
    np.testing.assert_allclose(out[1, 2, 3, :3], a[1, 1:4, 2:5].mean(axis=(0, 1)), rtol=1e-5)  # interior 3x3
    np.testing.assert_allclose(out[0, 0, 0, :3], a[0, :2, :2].mean(axis=(0, 1)), rtol=1e-5)  # corner: 2x2 valid
    np.testing.assert_allclose(out[..., 3:], 5.0, rtol=1e-6)  # constant survives pooling and resizing
    proj = rng.normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(patch.aggregate_patches([a, b], pool=1, grid=6, proj=proj)),
                               np.asarray(patch.aggregate_patches([a, b], pool=1, grid=6)) @ proj, rtol=1e-4,
                               atol=1e-5)


def test_patch_and_image_scores_against_brute_force():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(50, 4)).astype(np.float32)
    test = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    test[0, 1, 1] = bank[7]
    s = patch.patch_scores(test, bank, k=1)
    brute = np.sqrt(((test[..., None, :] - bank) ** 2).sum(-1)).min(-1)
    np.testing.assert_allclose(s, brute, rtol=1e-4, atol=1e-4)
    assert s[0, 1, 1] == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_allclose(patch.image_scores(s, "max"), brute.reshape(3, -1).max(1), rtol=1e-4)
    np.testing.assert_allclose(patch.image_scores(s, "topk_mean", topk=2),
                               np.sort(brute.reshape(3, -1), 1)[:, -2:].mean(1), rtol=1e-4)
    with pytest.raises(DN2Error, match="patches must be"):
        patch.patch_scores(test[0], bank)


def test_patchcore_reweighting_by_hand():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]], np.float32)
    patches = np.zeros((1, 1, 2, 2), np.float32)
    patches[0, 0, 1] = [0.0, -1.0]  # the worst patch: nearest bank row 0 at distance 1
    s = patch.patch_scores(patches, bank)
    got = patch.patchcore_scores(patches, s, bank, b=3)
    # N_3(m*) = rows 0, 1, 2; distances from m = (0, -1): 1, sqrt(2), 3
    d = np.array([1.0, np.sqrt(2.0), 3.0])
    assert got[0] == pytest.approx((1 - np.exp(d[0]) / np.exp(d).sum()) * 1.0, rel=1e-5)


def test_anomaly_maps_smoothing():
    scores = np.zeros((1, 4, 4), np.float32)
    const = patch.anomaly_maps(scores + 2.0, 32, sigma=2.0)
    assert const.shape == (1, 32, 32)
    np.testing.assert_allclose(const, 2.0, rtol=1e-5)
    scores[0, 1, 2] = 1.0
    plain = patch.anomaly_maps(scores, 32, sigma=0)
    smooth = patch.anomaly_maps(scores, 32, sigma=2.0)
    assert smooth.max() < plain.max()  # smoothing spreads the peak
    peak = np.array(np.unravel_index(smooth[0].argmax(), (32, 32)))
    assert np.abs(peak - [11.5, 19.5]).max() <= 0.5  # the centre of patch (1, 2) in the 8-px cells
    assert smooth.sum() == pytest.approx(plain.sum(), rel=0.02)  # mass kept away from the borders
    with pytest.raises(DN2Error, match="sigma"):
        patch.anomaly_maps(scores, 8, sigma=4.0)


def test_model_frame_and_overlays(tmp_path):
    preset = get_preset("efficientnet_lite0").at_size(32)
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[1, 10:30, 10:30] = 1
    m = patch.to_model_frame(masks, preset, masks=True)
    assert m.shape == (2, 32, 32) and m.dtype == bool and not m[0].any() and m[1].any()
    frame = patch.to_model_frame(_images(2, 40), preset)
    assert frame.shape == (2, 32, 32, 3) and frame.dtype == np.uint8
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    patch.save_overlays(frame, m.astype(np.float32), paths, titles=["a", "b"])
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(DN2Error, match="do not match"):
        patch.save_overlays(frame, m[:1].astype(np.float32), paths[:1])


@pytest.mark.slow
def test_end_to_end_on_synthetic_mvtec_folder(lite, tmp_path):
    """Synthetic defects written in the MVTec layout → bank → scores, maps and pixel metrics (random weights)."""
    from dn2_jax.data import load_mvtec
    from dn2_jax.metrics import roc_auc
    from dn2_jax.pixel_metrics import aupro, load_mvtec_masks, pixel_roc_auc
    from dn2_jax.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "syn", n_train=6, n_test_good=3, n_test_defect=3, size=64, seed=0)
    train, test = load_mvtec(str(root), "train"), load_mvtec(str(root), "test")
    masks = load_mvtec_masks(test.paths, test.defect_types)
    cfg = patch.PatchConfig(layers=("stage2", "stage3"), input_size=64, coreset=0.25, sigma=2.0)
    fn = patch.make_patch_fn("efficientnet_lite0", lite, cfg, batch_size=8)
    train_patches = fn(train.images)
    bank = patch.build_bank(train_patches, cfg)
    assert bank.shape == (6 * 16 * 16 // 4, 64)
    on_disk = patch.write_patches(train.images, fn, tmp_path / "bank.npy")
    np.testing.assert_allclose(on_disk, train_patches.reshape(-1, 64), rtol=1e-5, atol=1e-5)
    with pytest.raises(DN2Error, match="already exists"):
        patch.write_patches(train.images, fn, tmp_path / "bank.npy")
    res = patch.score_patch_images(test.images, bank, "efficientnet_lite0", lite, cfg, patch_fn=fn)
    assert res.image_scores.shape == (9,) and res.patch_scores.shape == (9, 16, 16) and res.maps.shape == (9, 64, 64)
    frame_masks = patch.to_model_frame(masks.astype(np.uint8), fn.preset, masks=True)
    img_auc = float(roc_auc(res.image_scores, test.labels))
    pix_auc = pixel_roc_auc(res.maps, frame_masks)
    assert 0.0 <= aupro(res.maps, frame_masks) <= 1.0
    assert img_auc >= 0.8 and pix_auc >= 0.6  # random weights at 64 px: coarse maps, yet clearly above chance
    with pytest.raises(DN2Error, match="bank has 3 dims"):
        patch.score_patch_images(test.images[:1], bank[:, :3], "efficientnet_lite0", lite, cfg, patch_fn=fn)
