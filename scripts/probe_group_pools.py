"""Probes behind the README's "tried on the full-size validation split" group figures (issue 14): ways to lift
the group pools that did NOT make it into dn2_jax.pooling. Same protocol as scripts/study_group.py (for normal
class c the set classes are c, ..., c+M-1 mod 10; dn2_jax.protocols.train_test_groups with seed = c; k = 2).

  white   the 'mean' and 'hist' (P = 8, 16, 32) pools, then whitened by a Ledoit-Wolf covariance of the normal
          train sets' pooled features: kNN in the whitened space, or the Mahalanobis norm as the score.
  pca     each image projected onto the top-d principal directions of the normal train images, mean-pooled;
          kNN, whitened kNN, Mahalanobis (d from --dims).
  smooth  the 'hist' pool with each image's soft assignment averaged over its 5 / 20 / 50 nearest normal train
          images (a train image's own row left out).

    python scripts/probe_group_pools.py --features /work/cache/study/fashion_mnist-tr0-te0-s0.npz --probe white
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_cleaning import auc, sq_dists  # noqa: E402
from study_features import load_features, split_views  # noqa: E402

from dn2_jax.pooling import fit_set_pool  # noqa: E402
from dn2_jax.protocols import train_test_groups  # noqa: E402


def knn(q, b, k=2):
    return np.partition(sq_dists(q, b), k - 1, axis=1)[:, :k].mean(1)


def whiten(train, test, cov):
    mu = train.mean(0)
    ev, evec = np.linalg.eigh(cov)
    w = evec / np.sqrt(np.maximum(ev, 1e-12))
    return (train - mu) @ w, (test - mu) @ w


def probe_white(bx, qx, normal, train_sets, groups, res):
    for pool, p in (("mean", 8), ("hist", 8), ("hist", 16), ("hist", 32)):
        sp = fit_set_pool(bx[normal], pool, prototypes=p, seed=0)
        zt, zq = np.asarray(sp(bx, train_sets), np.float64), np.asarray(sp(qx, groups.sets), np.float64)
        name = f"{pool}{p if pool == 'hist' else ''}"
        res.setdefault(name, []).append(auc(knn(zq, zt), groups.anomaly))
        wt, wq = whiten(zt, zq, LedoitWolf().fit(zt).covariance_)
        res.setdefault(name + " white knn", []).append(auc(knn(wq, wt), groups.anomaly))
        res.setdefault(name + " white maha", []).append(auc((wq**2).sum(1), groups.anomaly))


def probe_pca(bx, qx, normal, train_sets, groups, res, dims):
    bx, qx = bx.astype(np.float64), qx.astype(np.float64)
    mu = bx[normal].mean(0)
    _, _, vt = np.linalg.svd(bx[normal] - mu, full_matrices=False)
    for d in dims:
        zb, zq = (bx - mu) @ vt[:d].T, (qx - mu) @ vt[:d].T
        tr, te = zb[train_sets].mean(1), zq[groups.sets].mean(1)
        res.setdefault(f"pca{d} mean knn", []).append(auc(knn(te, tr), groups.anomaly))
        wt, wq = whiten(tr, te, np.cov(tr.T) + 1e-6 * np.eye(d))
        res.setdefault(f"pca{d} white knn", []).append(auc(knn(wq, wt), groups.anomaly))
        res.setdefault(f"pca{d} white maha", []).append(auc((wq**2).sum(1), groups.anomaly))


def nearest(x, ref, k, skip=None):
    """(len(x), k) indices into ref of each row's k nearest, nearest first (row skip[i] of ref left out)."""
    out = []
    for s in range(0, len(x), 2000):
        d = sq_dists(x[s : s + 2000], ref)
        if skip is not None:
            d[np.arange(len(d)), skip[s : s + 2000]] = np.inf
        out.append(np.argsort(d, axis=1)[:, :k])
    return np.concatenate(out)


def probe_smooth(bx, qx, normal, train_sets, groups, res):
    tr_imgs, te_imgs = np.unique(train_sets), np.unique(groups.sets)
    nb_tr = nearest(bx[tr_imgs], bx[normal], 50, skip=np.searchsorted(normal, tr_imgs))
    nb_te = nearest(qx[te_imgs], bx[normal], 50)
    for p in (8, 16):
        sp = fit_set_pool(bx[normal], "hist", prototypes=p, seed=0)
        a_norm = np.asarray(sp.assignments(bx[normal]))
        a_tr, a_te = np.asarray(sp.assignments(bx[tr_imgs])), np.asarray(sp.assignments(qx[te_imgs]))

        def pooled(a, imgs, sets):
            return a[np.searchsorted(imgs, sets)].mean(1)

        res.setdefault(f"hist{p}", []).append(
            auc(knn(pooled(a_te, te_imgs, groups.sets), pooled(a_tr, tr_imgs, train_sets)), groups.anomaly))
        for k in (5, 20, 50):
            s_tr, s_te = a_norm[nb_tr[:, :k]].mean(1), a_norm[nb_te[:, :k]].mean(1)
            res.setdefault(f"hist{p} smooth{k}", []).append(
                auc(knn(pooled(s_te, te_imgs, groups.sets), pooled(s_tr, tr_imgs, train_sets)), groups.anomaly))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--probe", choices=("white", "pca", "smooth"), required=True)
    ap.add_argument("--phase", choices=("val", "test"), default="val")
    ap.add_argument("--train-groups", type=int, default=1000)
    ap.add_argument("--test-groups", type=int, default=1000)
    ap.add_argument("--dims", default="2,4,8,16,32,64,128")
    args = ap.parse_args()
    bx, by, qx, qy = split_views(load_features(args.features), args.phase, 0)
    t0 = time.time()
    for m in (3, 5):
        res: dict = {}
        for c in range(10):
            classes = [(c + j) % 10 for j in range(m)]
            train_sets, groups = train_test_groups(by, qy, classes, args.train_groups, args.test_groups // 2,
                                                   args.test_groups - args.test_groups // 2, seed=c)
            normal = np.flatnonzero(np.isin(by, classes))
            if args.probe == "white":
                probe_white(bx, qx, normal, train_sets, groups, res)
            elif args.probe == "pca":
                probe_pca(bx, qx, normal, train_sets, groups, res, [int(d) for d in args.dims.split(",")])
            else:
                probe_smooth(bx, qx, normal, train_sets, groups, res)
        print(f"M={m} phase={args.phase}", {k: round(100 * float(np.mean(v)), 1) for k, v in res.items()},
              f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
