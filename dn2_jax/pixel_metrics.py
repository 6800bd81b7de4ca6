"""Pixel-level metrics of anomaly maps (NumPy / sklearn / scipy) and the MVTec AD ground-truth mask reader.

- `pixel_roc_auc`: ROC-AUC over all pixels of all images (defect pixels positive).
- `aupro`: area under the per-region-overlap (PRO) curve up to a false-positive rate ``max_fpr`` (0.3 in MVTec
  AD), divided by ``max_fpr``. For a threshold t, PRO(t) is the mean, over every connected ground-truth region
  (8-connectivity, per image, `scipy.ndimage.label`), of the fraction of that region's pixels scoring >= t;
  FPR(t) is the fraction of defect-free pixels scoring >= t. The curve is exact (every distinct score is a
  threshold), integrated with the trapezoid rule and cut at ``max_fpr`` by linear interpolation.
- `load_mvtec_masks`: the masks of an MVTec test split, ``<cat>/ground_truth/<defect>/<name>_mask.png``.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from dn2_jax.errors import DN2Error, DN2FileError

_EIGHT = np.ones((3, 3), bool)


def _check_maps(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise DN2Error(f"maps and masks must both be (N, H, W) of one shape, got {maps.shape} and {masks.shape}")
    if not np.all(np.isfinite(maps)):
        raise DN2Error("maps contain NaN or Inf")
    return maps.astype(np.float64), masks.astype(bool)


def pixel_roc_auc(maps: np.ndarray, masks: np.ndarray) -> float:
    """ROC-AUC of (N, H, W) scores against (N, H, W) masks (nonzero = defect), over all pixels pooled."""
    maps, masks = _check_maps(maps, masks)
    if masks.all() or not masks.any():
        raise DN2Error("pixel ROC-AUC needs both defect and defect-free pixels in masks")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct score threshold, descending thresholds (both start at 0 and end at 1)."""
    maps, masks = _check_maps(maps, masks)
    labels = np.zeros(masks.shape, np.int64)
    regions = 0
    for i, mask in enumerate(masks):
        lab, num = ndimage.label(mask, structure=_EIGHT)
        labels[i] = np.where(lab > 0, lab + regions, 0)
        regions += num
    negatives = int((~masks).sum())
    if regions == 0 or negatives == 0:
        raise DN2Error("PRO needs at least one defect region and one defect-free pixel in masks")
    sizes = np.bincount(labels.ravel(), minlength=regions + 1).astype(np.float64)
    flat_labels = labels.ravel()
    # Each defect pixel adds 1 / (|its region| * regions) to PRO, each defect-free pixel 1 / negatives to FPR.
    pro_step = np.where(flat_labels > 0, 1.0 / (sizes[flat_labels] * regions), 0.0)
    fpr_step = np.where(flat_labels == 0, 1.0 / negatives, 0.0)
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    pro, fpr = np.cumsum(pro_step[order]), np.cumsum(fpr_step[order])
    last = np.r_[scores[1:] != scores[:-1], True]  # the end of each group of tied scores
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``max_fpr`` (in (0, 1]): 1 is perfect, ~max_fpr/2 random."""
    if not 0.0 < max_fpr <= 1.0:
        raise DN2Error(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(maps, masks)
    fpr, pro = np.minimum(fpr, 1.0), np.minimum(pro, 1.0)  # cumsum rounding
    cut = np.searchsorted(fpr, max_fpr, side="right")  # fpr[:cut] <= max_fpr
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr) and x[-1] < max_fpr:
        f0, f1, p0, p1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        x, y = np.r_[x, max_fpr], np.r_[y, p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)]
    return float(np.trapezoid(y, x) / max_fpr)


def mask_path(image_path: str | os.PathLike) -> str:
    """MVTec AD mask of a test image: <cat>/test/<defect>/<name>.png → <cat>/ground_truth/<defect>/<name>_mask.png."""
    image_path = os.fspath(image_path)
    defect_dir, name = os.path.split(image_path)
    test_dir, defect = os.path.split(defect_dir)
    category = os.path.dirname(test_dir)
    stem = os.path.splitext(name)[0]
    return os.path.join(category, "ground_truth", defect, f"{stem}_mask.png")


def load_mvtec_masks(paths: list[str], defect_types: list[str], shapes: list[tuple[int, int]] | None = None
                     ) -> np.ndarray | list[np.ndarray]:
    """Masks bool (N, H, W) (a list if sizes differ) for MVTec test images ``paths`` with ``defect_types``
    ('good' → all zero), as in `dn2_jax.data.load_mvtec(cat, "test")`'s ``paths`` / ``defect_types``.

    ``shapes``: each image's (H, W); by default read from the image files. A missing mask, or one whose size
    differs from its image, raises `DN2FileError` / `DN2Error` naming the file (every mask is checked first).
    """
    from PIL import Image

    if len(paths) != len(defect_types) or (shapes is not None and len(shapes) != len(paths)):
        raise DN2Error(f"paths ({len(paths)}), defect_types ({len(defect_types)}) and shapes must have one length")
    if shapes is None:
        shapes = []
        for p in paths:
            with Image.open(p) as im:
                shapes.append((im.height, im.width))
    missing = [mask_path(p) for p, d in zip(paths, defect_types, strict=True)
               if d != "good" and not os.path.isfile(mask_path(p))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DN2FileError(f"ground-truth mask {missing[0]} does not exist{more}; MVTec layout: "
                           f"<category>/ground_truth/<defect>/<name>_mask.png")
    masks = []
    for p, d, shape in zip(paths, defect_types, shapes, strict=True):
        if d == "good":
            masks.append(np.zeros(tuple(shape), bool))
            continue
        path = mask_path(p)
        try:
            with Image.open(path) as im:
                m = np.asarray(im.convert("L")) > 0
        except OSError as e:
            raise DN2FileError(f"ground-truth mask {path} cannot be read: {e}") from None
        if m.shape != tuple(shape):
            raise DN2Error(f"ground-truth mask {path} is {m.shape[1]}x{m.shape[0]} px but its image {p} is "
                           f"{shape[1]}x{shape[0]} px")
        masks.append(m)
    if len({m.shape for m in masks}) == 1:
        return np.stack(masks)
    return masks
