"""Pixel ROC-AUC and AUPRO against hand-computed cases; MVTec masks; the synthetic-defect generator."""

import numpy as np
import pytest
from PIL import Image

from dn2_jax.data import load_mvtec
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.pixel_metrics import aupro, load_mvtec_masks, mask_path, pixel_roc_auc, pro_curve
from dn2_jax.synthetic import make_synthetic, write_synthetic_mvtec

# One 1x6 image: regions {0, 1} and {5}; defect-free pixels 2, 3, 4.
MAP = np.array([[[0.9, 0.3, 0.8, 0.1, 0.2, 0.7]]])
MASK = np.array([[[1, 1, 0, 0, 0, 1]]], bool)


def test_pixel_roc_auc_by_hand():
    # positives .9 .3 .7 vs negatives .8 .1 .2: .9 wins 3, .3 wins 2, .7 wins 2 of 9 pairs
    assert pixel_roc_auc(MAP, MASK) == pytest.approx(7 / 9)
    with pytest.raises(DN2Error, match="both defect and defect-free"):
        pixel_roc_auc(MAP, np.zeros_like(MASK))
    with pytest.raises(DN2Error, match="one shape"):
        pixel_roc_auc(MAP, MASK[:, :, :5])


def test_pro_curve_and_aupro_by_hand():
    fpr, pro = pro_curve(MAP, MASK)
    # thresholds .9 .8 .7 .3 .2 .1: region {0,1} counts 1/2 per pixel, region {5} all at once; PRO = their mean
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1])
    assert aupro(MAP, MASK, max_fpr=1.0) == pytest.approx((1 / 3 * 0.25 + 2 / 3 * 1) / 1.0)
    assert aupro(MAP, MASK, max_fpr=0.5) == pytest.approx((1 / 3 * 0.25 + (0.5 - 1 / 3)) / 0.5)
    assert aupro(MAP, MASK, max_fpr=0.3) == pytest.approx(0.25)  # cut inside the first flat step
    assert aupro(MASK.astype(float), MASK) == pytest.approx(1.0)
    with pytest.raises(DN2Error, match="max_fpr"):
        aupro(MAP, MASK, max_fpr=0)


def test_regions_are_8_connected_and_per_image():
    mask = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], bool)  # one region by 8-connectivity (two by 4)
    scores = np.zeros((1, 3, 3))
    scores[0, 0, 0] = 1.0
    _, pro = pro_curve(scores, mask)
    assert pro[1] == pytest.approx(1 / 3)
    # the same region in two images counts twice, each with weight 1/2
    _, pro2 = pro_curve(np.concatenate([scores, np.zeros_like(scores)]), np.concatenate([mask, mask]))
    assert pro2[1] == pytest.approx(1 / 6)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_load_mvtec_masks_pairs_and_errors(tmp_path):
    cat = tmp_path / "cat"
    img = np.zeros((6, 8, 3), np.uint8)
    _write_png(cat / "train" / "good" / "000.png", img)
    _write_png(cat / "test" / "good" / "000.png", img)
    _write_png(cat / "test" / "crack" / "000.png", img)
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 1:3] = 255
    _write_png(cat / "ground_truth" / "crack" / "000_mask.png", mask)
    ds = load_mvtec(str(cat), "test")
    masks = load_mvtec_masks(ds.paths, ds.defect_types)
    assert masks.shape == (2, 6, 8) and masks.dtype == bool
    good = ds.defect_types.index("good")
    assert not masks[good].any() and masks[1 - good].sum() == 4
    assert mask_path(str(cat / "test" / "crack" / "000.png")) == str(cat / "ground_truth" / "crack" / "000_mask.png")
    _write_png(cat / "ground_truth" / "crack" / "000_mask.png", mask[:5])
    with pytest.raises(DN2Error, match=r"000_mask.png is 8x5 px but its image .* is 8x6 px"):
        load_mvtec_masks(ds.paths, ds.defect_types)
    (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DN2FileError, match="ground-truth mask .*000_mask.png does not exist"):
        load_mvtec_masks(ds.paths, ds.defect_types)


def test_synthetic_generator_seeded_and_written_in_mvtec_layout(tmp_path):
    kwargs = dict(n_train=2, n_test_good=2, n_test_defect=2, size=32, seed=3)
    a, b = make_synthetic(**kwargs), make_synthetic(**kwargs)
    np.testing.assert_array_equal(a["test"], b["test"])
    assert not np.array_equal(a["test"], make_synthetic(**{**kwargs, "seed": 4})["test"])
    assert a["defect"] == ["good", "good", "scratch", "scratch", "blob", "blob"]
    np.testing.assert_array_equal(a["label"], [0, 0, 1, 1, 1, 1])
    assert not a["masks"][:2].any() and all(m.any() for m in a["masks"][2:])
    # defect pixels changed, the rest of a defect image is a plain texture
    root = write_synthetic_mvtec(tmp_path / "syn", **kwargs)
    test = load_mvtec(str(root), "test")
    masks = load_mvtec_masks(test.paths, test.defect_types)
    order = np.argsort([f"{d}/{i}" for d, i in zip(a["defect"], [0, 1, 0, 1, 0, 1], strict=True)])
    np.testing.assert_array_equal(test.images, a["test"][order])
    np.testing.assert_array_equal(masks, a["masks"][order])
    assert len(load_mvtec(str(root), "train")) == 2
    with pytest.raises(DN2Error, match="not an empty directory"):
        write_synthetic_mvtec(root, **kwargs)
    with pytest.raises(DN2Error, match="unknown defect"):
        make_synthetic(defects=("dent",))
