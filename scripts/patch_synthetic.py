"""Patch-level goals on the synthetic-defect set (dn2_jax.synthetic): image and pixel ROC-AUC, AUPRO.

Layers are chosen on a validation set (generator seed 1), then the chosen configuration is run once on the
test set (seed 2), which is written to disk in the MVTec AD layout and read back with dn2_jax.data.load_mvtec
and dn2_jax.pixel_metrics.load_mvtec_masks, so the file path is checked end to end. Backbone: EfficientNet-Lite0
ImageNet weights. Writes JSON (--out) and a figure of maps (--figure).
Usage: nice -n 10 python scripts/patch_synthetic.py --out benchmarks/results/patch_synthetic.json \\
           --figure docs/patch_maps.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dn2_jax.convert import load_variables
from dn2_jax.data import load_mvtec
from dn2_jax.metrics import roc_auc
from dn2_jax.patch import PatchConfig, build_bank, make_patch_fn, maps_figure, score_patch_images, to_model_frame
from dn2_jax.pixel_metrics import aupro, load_mvtec_masks, pixel_roc_auc
from dn2_jax.synthetic import make_synthetic, write_synthetic_mvtec

CANDIDATES = [("stage3", "stage5"), ("stage3", "stage4"), ("stage4", "stage5")]


def run(cfg, variables, train, test, masks, labels):
    t = time.perf_counter()
    fn = make_patch_fn("efficientnet_lite0", variables, cfg, batch_size=16)
    bank = build_bank(fn(train), cfg)
    res = score_patch_images(test, bank, "efficientnet_lite0", variables, cfg, patch_fn=fn)
    frame_masks = to_model_frame(masks.astype(np.uint8), fn.preset, masks=True)
    out = {"layers": list(cfg.layers), "grid": fn.grid, "dims": fn.feature_dim, "bank": len(bank),
           "image_auc": 100 * float(roc_auc(res.image_scores, labels)),
           "pixel_auc": 100 * pixel_roc_auc(res.maps, frame_masks),
           "aupro": 100 * aupro(res.maps, frame_masks), "seconds": round(time.perf_counter() - t, 1)}
    return out, res, fn, frame_masks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/patch_synthetic.json")
    ap.add_argument("--figure", default="docs/patch_maps.png")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--coreset", type=float, default=0.1)
    args = ap.parse_args()
    variables = load_variables("efficientnet_lite0")
    val = make_synthetic(n_train=32, n_test_good=16, n_test_defect=8, size=args.size, seed=1)
    results = {"generator": "dn2_jax.synthetic.make_synthetic", "size": args.size, "validation": []}
    for layers in CANDIDATES:
        cfg = PatchConfig(layers=layers, coreset=args.coreset)
        r, *_ = run(cfg, variables, val["train"], val["test"], val["masks"], val["label"])
        print("validation", r, flush=True)
        results["validation"].append(r)
    best = max(results["validation"], key=lambda r: r["image_auc"] + r["pixel_auc"])
    cfg = PatchConfig(layers=tuple(best["layers"]), coreset=args.coreset)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_mvtec(Path(tmp) / "synthetic", n_train=args.train, n_test_good=40,
                                     n_test_defect=30, size=args.size, seed=2)
        train, test = load_mvtec(str(root), "train"), load_mvtec(str(root), "test")
        masks = load_mvtec_masks(test.paths, test.defect_types)
        r, res, fn, frame_masks = run(cfg, variables, train.images, test.images, masks, test.labels)
        frame = to_model_frame(test.images, fn.preset)
        defects = test.defect_types
    r.update(seed_validation=1, seed_test=2, n_train=args.train, n_test=len(defects),
             n_defect=int(np.sum(test.labels)), coreset=args.coreset)
    results["test"] = r
    print("test", r, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    figure(frame, res.maps, frame_masks, defects, res.image_scores, args.figure)


def figure(frame, maps, masks, defects, scores, path):
    from dn2_jax.evaluation.report import save_figure

    save_figure(maps_figure(frame, maps, defects, scores, masks), path, dpi=90)
    print("figure", path, flush=True)


if __name__ == "__main__":
    main()
