"""`dn2 eval --level patch`: the one-class protocol with the patch-level detector, plus pixel metrics.

Per normal class (an MVTec-style folder: its one category) the detector `dn2 fit --level patch` deploys
(`dn2_jax.patch_detector.PatchDetector`, the run's settings) is fitted to the bank images and scores every test
image: image ROC-AUC from the image scores, and, where the folder has ground-truth masks
(``<cat>/ground_truth/<defect>/<name>_mask.png``), pixel ROC-AUC and AUPRO (FPR <= 0.3) of the anomaly maps
against the masks brought into the maps' frame (`dn2_jax.patch.to_model_frame`), in ``extra`` of
results.json (``pixel_auc``, ``aupro``). Every mask is read and checked (missing or mis-sized: an error) before
any image is embedded. With a cache directory, training patch features are kept in a resumable store under
``<cache>/patches-<key>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax.data import Dataset
from dn2_jax.detector import Detector
from dn2_jax.evaluation.config import EvalConfig
from dn2_jax.evaluation.report import ClassResult, save_figure
from dn2_jax.metrics import roc_auc
from dn2_jax.patch import maps_figure, to_model_frame
from dn2_jax.pixel_metrics import aupro, load_mvtec_masks, pixel_roc_auc

#: Images of each kind (good, each defect type) shown in maps.png.
FIGURE_PER_KIND = 2


def _subset(images: Any, idx: np.ndarray) -> Any:
    return images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]


def ground_truth_masks(cfg: EvalConfig, test: Dataset, printer=print) -> list[np.ndarray] | None:
    """The ground-truth masks (bool (H, W) each) of an MVTec-style test split, or None (not an MVTec folder, or
    one without a ground_truth/ folder: image metrics only, said through `printer`). A missing or mis-sized
    mask raises, naming the file."""
    if not cfg.dataset.startswith("mvtec:") or test.paths is None or test.defect_types is None:
        return None
    root = cfg.dataset.split(":", 1)[1]
    if not os.path.isdir(os.path.join(root, "ground_truth")):
        printer(f"  no ground_truth/ folder in {root}: image metrics only")
        return None
    shapes = [np.shape(im)[:2] for im in test.images]
    masks = load_mvtec_masks(list(test.paths), list(test.defect_types), shapes)
    return list(masks)


def _frame_masks(masks: list[np.ndarray], preset) -> np.ndarray:
    if len({m.shape for m in masks}) == 1:
        return to_model_frame(np.stack(masks).astype(np.uint8), preset, masks=True)
    return np.concatenate([to_model_frame(m[None].astype(np.uint8), preset, masks=True) for m in masks])


def _patch_store(cfg: EvalConfig, extract, ds: Dataset, idx: np.ndarray) -> Path | None:
    if cfg.cache_dir is None:
        return None
    key = json.dumps({**extract.metadata(ds), "rows": hashlib.sha256(np.asarray(idx).tobytes()).hexdigest()},
                     sort_keys=True)
    return Path(cfg.cache_dir) / f"patches-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def run_patch(cfg: EvalConfig, train: Dataset, test: Dataset, splits: dict, extract, log) -> Iterator[ClassResult]:
    """Fits and scores one patch-level detector per split (class name -> protocols.OneClassSplit); yields
    ClassResults with ``extra`` pixel_auc / aupro where masks exist and ``maps`` (the maps.png panel data)."""
    masks = ground_truth_masks(cfg, test, log.print)
    template = extract.detector  # its patch function (and compiled code) is shared by every class's detector
    names = test.defect_types
    for split in splits.values():  # every image checked before any work
        for ds, idx in ((train, split.bank), (test, split.test)):
            template.check_images(_subset(ds.images, idx), None if ds.paths is None else [ds.paths[i] for i in idx])
    for name, split in splits.items():
        det = Detector(cfg.detector_config()).share_features(template)
        bank_images, test_images = _subset(train.images, split.bank), _subset(test.images, split.test)
        log.print(f"  {name}: patch bank of {len(split.bank)} images, scoring {len(split.test)}")
        store = _patch_store(cfg, extract, train, split.bank) if isinstance(bank_images, np.ndarray) else None
        det.fit(bank_images, patch_store=store)
        query, res = det.query_maps(test_images)
        labels = split.test_anomaly
        scores = np.asarray(query.scores, np.float64)
        extra: dict[str, float] = {"bank_patches": det.bank_size}
        frame_masks = None
        if masks is not None:
            frame_masks = _frame_masks([masks[i] for i in split.test], det.patch_fn.preset)
            if frame_masks.any() and not frame_masks.all():
                extra["pixel_auc"] = pixel_roc_auc(res.maps, frame_masks)
                extra["aupro"] = aupro(res.maps, frame_masks)
        kinds = ([names[i] for i in split.test] if names is not None
                 else ["anomalous" if a else "normal" for a in labels])
        picks = [i for kind in dict.fromkeys(kinds) for i in [j for j, n in enumerate(kinds) if n == kind]
                 [:FIGURE_PER_KIND]]
        frame = to_model_frame(np.stack([np.asarray(_subset(test_images, [i])[0]) for i in picks])
                               if not isinstance(test_images, np.ndarray) else test_images[picks],
                               det.patch_fn.preset)
        panel = {"frame": frame, "maps": res.maps[picks], "names": [kinds[i] for i in picks],
                 "scores": query.scores[picks], "masks": None if frame_masks is None else frame_masks[picks]}
        yield ClassResult(name, float(roc_auc(scores, labels)), scores, labels, len(split.bank), extra, maps=panel)


def write_maps(out_dir: str | os.PathLike, per_class: list[ClassResult]) -> list[Path]:
    """maps.png (one class) or maps_<class>.png per class: images, masks and anomaly maps of a few test
    images of each kind (`dn2_jax.patch.maps_figure`), written atomically."""
    with_maps = [r for r in per_class if r.maps is not None]
    written = []
    for r in with_maps:
        safe = "".join(ch if ch.isalnum() else "_" for ch in r.name)[:40]
        path = Path(out_dir) / ("maps.png" if len(with_maps) == 1 else f"maps_{safe}.png")
        written.append(save_figure(maps_figure(**r.maps), path, dpi=90))
    return written
