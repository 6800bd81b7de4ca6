"""Study of orderless set pooling for group anomaly detection (issue 14): the paper's mean pool vs the pools of
dn2_jax.pooling vs the pointwise baseline, on a validation split carved out of TRAIN (to choose the default
pool and prototype count) and then on TEST (to report).

Protocol (features from scripts/study_features.py: Lite0 224x224, L2-normalised): for normal class c and set
size M the group classes are (c, c+1, ..., c+M-1) mod 10; dn2_jax.protocols.train_test_groups(bank labels,
query labels, classes, --train-groups, --test-groups/2 normal, --test-groups/2 anomalous, seed = seed + c)
makes the sets (an anomalous set misses one class and repeats another).
  val   train sets from the train pool, test sets from the held-out sixth of train (study_features).
  test  train sets from the whole train subsample, test sets from the test subsample.
The pool is fitted on the normal train images only (every bank-side image of the group classes, of which the
train sets are drawn; 'comp' on the normal train sets themselves); the DN2 score is the mean squared distance
of a pooled test set to its k nearest pooled train sets (k: the pool's, `SetPool.score_k`: 2, or a share of the
train sets for 'comp'; --score-ks scans it). Pointwise: each test image scored against those normal train
images (k = 2), averaged over its set. ROC-AUC per class, mean over the 10 classes.

    python scripts/study_group.py --features /tmp/dn2-study/fashion_mnist-tr600-te2000-s0.npz --phase val
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_cleaning import auc, sq_dists  # noqa: E402
from study_features import load_features, split_views  # noqa: E402

from dn2_jax import pooling  # noqa: E402
from dn2_jax.pooling import DEFAULT_POOL, SET_POOLS, fit_set_pool  # noqa: E402
from dn2_jax.protocols import train_test_groups  # noqa: E402

SCORE_K = 2


def knn_score(q: np.ndarray, b: np.ndarray, k: int = SCORE_K) -> np.ndarray:
    return np.partition(sq_dists(q, b), k - 1, axis=1)[:, :k].mean(1)


def run(f, phase: str, m: int, configs: dict, n_train: int, n_test: int, seed: int) -> dict:
    """{config name: mean AUC}; configs map a name to (pool, prototypes) or 'pointwise'."""
    bx, by, qx, qy = split_views(f, phase, seed)
    n_classes = int(by.max()) + 1
    aucs = {name: [] for name in configs}
    for c in range(n_classes):
        classes = [(c + j) % n_classes for j in range(m)]
        train_sets, groups = train_test_groups(by, qy, classes, n_train, n_test // 2, n_test - n_test // 2,
                                               seed=seed + c)
        normal_imgs = np.flatnonzero(np.isin(by, classes))  # every train (pool) image of the group classes
        fitted: dict = {}  # (pool, P, T) -> (SetPool, query-to-train-set squared distances)
        for name, cfg in configs.items():
            if cfg == "pointwise":
                s = knn_score(qx[groups.sets.ravel()], bx[normal_imgs]).reshape(groups.sets.shape).mean(1)
            else:
                pool, p, scale, k = cfg
                pooling.TEMPERATURE_SCALE = scale  # the study's knob; the library's value is the chosen one
                key = (pool, p, scale)
                if key not in fitted:
                    sp = (fit_set_pool(bx, pool, sets=train_sets, seed=seed) if pool == "comp"
                          else fit_set_pool(bx[normal_imgs], pool, prototypes=p, seed=seed))
                    fitted[key] = (sp, sq_dists(np.asarray(sp(qx, groups.sets)), np.asarray(sp(bx, train_sets))))
                sp, d = fitted[key]
                k = sp.score_k(len(train_sets)) if k is None else k
                s = np.partition(d, k - 1, axis=1)[:, :k].mean(1)
            aucs[name].append(auc(s, groups.anomaly))
    return {name: 100 * float(np.mean(v)) for name, v in aucs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--phase", choices=("val", "test"), default="val")
    ap.add_argument("--sizes", default="3,5")
    ap.add_argument("--train-groups", type=int, default=200)
    ap.add_argument("--test-groups", type=int, default=200)
    ap.add_argument("--pools", default=",".join(SET_POOLS))
    ap.add_argument("--prototypes", default="8,16,32")
    ap.add_argument("--temperature-scales", default=str(pooling.TEMPERATURE_SCALE),
                    help="values of dn2_jax.pooling.TEMPERATURE_SCALE to try for pools with a 'hist' part")
    ap.add_argument("--score-ks", default="",
                    help="DN2 score k values to scan (default: each pool's own, SetPool.score_k)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    f = load_features(args.features)
    t0 = time.perf_counter()
    configs: dict = {"pointwise": "pointwise"}
    scales = [float(t) for t in args.temperature_scales.split(",")]
    score_ks = [int(k) for k in args.score_ks.split(",")] if args.score_ks else [None]
    for pool in args.pools.split(","):
        for k in score_ks:
            at_k = "" if k is None else f" k={k}"
            if "hist" not in pool.split("+"):
                configs[pool + at_k] = (pool, 8, 1.0, k)
                continue
            for p in [int(p) for p in args.prototypes.split(",")]:
                for t in scales:
                    configs[f"{pool} P={p}" + (f" T×{t:g}" if len(scales) > 1 else "") + at_k] = (pool, p, t, k)
    sizes = [int(s) for s in args.sizes.split(",")]
    res = {m: run(f, args.phase, m, configs, args.train_groups, args.test_groups, args.seed) for m in sizes}
    bx, _, qx, _ = split_views(f, args.phase, args.seed)
    print(f"\n## Group anomaly detection, phase={args.phase}: mean ROC-AUC over 10 classes; "
          f"{args.train_groups} normal train sets, {args.test_groups} test sets (half anomalous) per class; "
          f"bank images from {len(bx)}, test images from {len(qx)}; default pool {DEFAULT_POOL!r}")
    print("| pool | " + " | ".join(f"M = {m}" for m in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in configs:
        print(f"| {name} | " + " | ".join(f"{res[m][name]:.1f}" for m in sizes) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
