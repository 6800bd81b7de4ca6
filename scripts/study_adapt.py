"""Study of feature adaptation (issue 16) on a validation split carved out of TRAIN, to choose the settings of
the reported `dn2 eval --adapt` runs without looking at the test split.

Protocol per normal class c (Fashion-MNIST or MNIST, EfficientNet-Lite0 with its ImageNet weights):
  split  scripts/study_features.validation_split: per class a seeded sixth of the train images is held out
         (validation), the rest is the pool.
  bank   `--bank-size` seeded images of class c from the pool; the backbone is adapted on them, and they are
         the kNN bank (k = 2, L2-normalised features, as `dn2 eval`).
  val    queries: `--val-normal` held-out images of class c (normal) and as many held-out images of the other
         classes, stratified (anomalies).
The validation ROC-AUC is printed for the pretrained network (epoch 0) and after each epoch.

    python scripts/study_adapt.py --dataset fashion_mnist --classes 6,2 --method panda --epochs 3 --input-size 112
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_features import validation_split  # noqa: E402

from dn2_jax import adapt, models  # noqa: E402
from dn2_jax.convert import load_variables  # noqa: E402
from dn2_jax.data import load_dataset  # noqa: E402
from dn2_jax.hostmem import keep_freed_memory  # noqa: E402
from dn2_jax.knn import knn_score, l2_normalize  # noqa: E402
from dn2_jax.metrics import roc_auc  # noqa: E402
from dn2_jax.sharding import data_mesh  # noqa: E402


def val_queries(labels: np.ndarray, val: np.ndarray, c: int, n_normal: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into train, anomaly labels): n_normal held-out images of class c, n_normal of the others."""
    rng = np.random.default_rng(seed + 17 * c)
    normal = rng.choice(val[labels[val] == c], min(n_normal, int(np.sum(labels[val] == c))), replace=False)
    others = val[labels[val] != c]
    anomalous = rng.choice(others, len(normal), replace=False)
    idx = np.concatenate([normal, anomalous])
    return idx, np.r_[np.zeros(len(normal)), np.ones(len(anomalous))].astype(bool)


def main(argv=None) -> None:
    keep_freed_memory()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--method", default="panda", choices=adapt.METHODS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bn", default="frozen", choices=adapt.BN_POLICIES)
    p.add_argument("--anchor-weight", type=float, default=1e-3)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--bank-size", type=int, default=500)
    p.add_argument("--val-normal", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per class here")
    args = p.parse_args(argv)

    train = load_dataset(args.dataset, "train")
    labels = np.asarray(train.labels)
    pool, val = validation_split(labels, seed=args.seed)
    spec = models.get_backbone("efficientnet_lite0")
    base = load_variables("efficientnet_lite0")
    preset = spec.preset.at_size(args.input_size)
    pooled = adapt.pooled_features_fn(spec.module(), preset, data_mesh(jax.local_devices()), 64)
    cfg = adapt.AdaptConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.lr, bn=args.bn, anchor_weight=args.anchor_weight, seed=args.seed)
    aucs = []
    for c in [int(x) for x in args.classes.split(",")]:
        rng = np.random.default_rng(args.seed + c)
        members = pool[labels[pool] == c]
        bank_idx = np.sort(rng.choice(members, min(args.bank_size, len(members)), replace=False))
        q_idx, q_anom = val_queries(labels, val, c, args.val_normal, args.seed)
        bank_images, q_images = train.images[bank_idx], train.images[q_idx]

        def auc(variables, bank_images=bank_images, q_images=q_images, q_anom=q_anom) -> float:
            p_, s_ = variables["params"], variables["batch_stats"]
            b = l2_normalize(pooled(p_, s_, bank_images))
            q = l2_normalize(pooled(p_, s_, q_images))
            return 100 * float(roc_auc(knn_score(q, b, k=2), q_anom))

        t0 = time.perf_counter()
        a0 = auc(base)
        t_embed = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, history = adapt.adapt(bank_images, spec, base, cfg, input_size=args.input_size, progress=False,
                                 on_epoch=lambda e, v: {"val_auc": auc(v)})
        t_total = time.perf_counter() - t0
        row = {"class": c, "val_auc_pretrained": round(a0, 2),
               "val_auc": [round(r["val_auc"], 2) for r in history], "loss": [r["loss"] for r in history],
               "spread": [round(r["spread"], 3) for r in history], "adapt_s_incl_val": round(t_total, 1),
               "val_embed_s": round(t_embed, 1), "config": cfg.to_dict(), "input_size": args.input_size,
               "bank_size": len(bank_idx), "dataset": args.dataset}
        aucs.append([a0] + [r["val_auc"] for r in history])
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    mean = np.mean(np.asarray(aucs), axis=0)
    print("mean val AUC by epoch (0 = pretrained):", " ".join(f"{m:.2f}" for m in mean), flush=True)


if __name__ == "__main__":
    main()
