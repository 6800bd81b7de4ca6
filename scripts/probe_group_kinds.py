"""Probes behind the README's group figures of session 7 (issue 14): how the 'comp' pool of dn2_jax.pooling came
about, with its ablations. Same protocol as scripts/study_group.py (validation phase by default; for normal class
c the set classes are c, ..., c+M-1 mod 10; 1,000 normal train sets and 1,000 test sets per class, seed = c).

  pairs   sorted pairwise squared distances within a set (a second-order orderless statistic): alone (kNN, or
          minus the smallest distance), and appended to the 'hist' pool with weights 0.25-2.
  setkm   k-means whose Lloyd steps give each normal train set's images distinct kinds (P = M, and P = 2M with
          injective assignments), then the soft histogram over those centres (temperature 0.1 / 0.3 / 1 x);
          purity of plain and constrained k-means.
  setlda  kinds from k-means with / without the distinct-kinds constraint, then a shared-covariance Gaussian
          (scikit-learn LDA, Ledoit-Wolf) refitted up to 5 rounds; the composition distribution scored by kNN
          (k = 2, 20, 100) and -log P(one image of each kind). ("con lda comp knn" is what the library's 'comp'
          pool does.)

    python scripts/probe_group_kinds.py --features /work/cache/study/fashion_mnist-tr0-te0-s0.npz --probe setlda
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis as LDA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_cleaning import auc, sq_dists  # noqa: E402
from study_features import load_features, split_views  # noqa: E402

from dn2_jax import hostmem  # noqa: E402
from dn2_jax.pooling import composition_probs, compositions, fit_set_pool, kmeans  # noqa: E402
from dn2_jax.protocols import train_test_groups  # noqa: E402


def knn(q, b, k=2):
    return np.partition(sq_dists(q, b), k - 1, axis=1)[:, :k].mean(1)


def softmax_d(x, c, t):
    z = -sq_dists(x, c) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def constrained(cost, perms):
    """(G*M,) kinds: per set (cost (G, M, P)), the assignment in perms (Q, M) of least total cost."""
    m = cost.shape[1]
    tot = cost[:, np.arange(m)[None, :], perms].sum(-1)
    return perms[tot.argmin(1)].ravel()


def purity(lab, y):
    return sum(np.bincount(y[lab == j]).max() for j in np.unique(lab)) / len(y)


def pair_sorted(x, sets):
    s = x[sets].astype(np.float64)
    iu = np.triu_indices(s.shape[1], 1)
    d = ((s[:, :, None, :] - s[:, None, :, :]) ** 2).sum(-1)[:, iu[0], iu[1]]
    return np.sort(d, axis=1)


def probe_pairs(bx, qx, m, train_sets, groups, normal, res):
    sp = fit_set_pool(bx[normal], "hist", prototypes=8, seed=0)
    ht, hq = np.asarray(sp(bx, train_sets), np.float64), np.asarray(sp(qx, groups.sets), np.float64)
    res.setdefault("hist8", []).append(auc(knn(hq, ht), groups.anomaly))
    pt, pq = pair_sorted(bx, train_sets), pair_sorted(qx, groups.sets)
    res.setdefault("-minpair", []).append(auc(-pq[:, 0], groups.anomaly))
    res.setdefault("pair knn", []).append(auc(knn(pq, pt), groups.anomaly))
    mu, sd = pt.mean(0), pt.std(0) + 1e-9
    zt, zq = (pt - mu) / sd, (pq - mu) / sd
    hs = np.sqrt(ht.var(0).sum())
    for w in (0.25, 0.5, 1, 2):
        a_t = np.concatenate([ht / hs, w * zt / np.sqrt(zt.shape[1])], 1)
        a_q = np.concatenate([hq / hs, w * zq / np.sqrt(zq.shape[1])], 1)
        res.setdefault(f"hist+pairz w{w}", []).append(auc(knn(a_q, a_t), groups.anomaly))


def set_kmeans(xs, p, init, iters=50):
    g, m, d = xs.shape
    perms = np.array(list(itertools.permutations(range(p), m)))
    c, flat, prev = init.copy(), xs.reshape(-1, d), None
    for _ in range(iters):
        dist = sq_dists(flat, c).reshape(g, m, p)
        lab = constrained(dist, perms)
        if prev is not None and (lab == prev).all():
            break
        prev = lab
        c = np.stack([flat[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(p)])
    return c, dist.reshape(-1, p)[np.arange(len(lab)), lab].mean()


def probe_setkm(bx, by, qx, m, train_sets, groups, normal, res):
    xs = bx[train_sets].astype(np.float64)
    for p in (m, 2 * m):
        init = np.asarray(kmeans(bx[normal], p, seed=0), np.float64)
        cent, msd = set_kmeans(xs, p, init)
        res.setdefault(f"purity setkm P={p}", []).append(purity(sq_dists(bx[normal], cent).argmin(1), by[normal]))
        res.setdefault(f"purity km P={p}", []).append(purity(sq_dists(bx[normal], init).argmin(1), by[normal]))
        for ts in (0.1, 0.3, 1.0):
            at, aq = softmax_d(bx, cent, ts * msd), softmax_d(qx, cent, ts * msd)
            res.setdefault(f"setkm P={p} T{ts}", []).append(
                auc(knn(aq[groups.sets].mean(1), at[train_sets].mean(1)), groups.anomaly))


def probe_setlda(bx, by, qx, m, train_sets, groups, normal, res):
    xs = bx[train_sets].astype(np.float64)
    g, _, d = xs.shape
    flat = xs.reshape(-1, d)
    perms = np.array(list(itertools.permutations(range(m))))
    init = np.asarray(kmeans(bx[normal], m, seed=0), np.float64)
    one = compositions(m, m).index((1,) * m)
    for name, constraint in (("con", True), ("free", False)):
        cent, prev = init.copy(), None
        for _ in range(50):
            dist = sq_dists(flat, cent)
            lab = constrained(dist.reshape(g, m, m), perms) if constraint else dist.argmin(1)
            if prev is not None and (lab == prev).all():
                break
            prev = lab
            cent = np.stack([flat[lab == j].mean(0) if (lab == j).any() else cent[j] for j in range(m)])
        msd = sq_dists(flat, cent)[np.arange(len(lab)), lab].mean()
        res.setdefault(f"purity {name} km labels", []).append(purity(lab, by[train_sets].ravel()))
        km = (softmax_d(bx, cent, 0.3 * msd), softmax_d(qx, cent, 0.3 * msd))
        for _ in range(5):
            lp = LDA(solver="lsqr", shrinkage="auto").fit(flat, lab).predict_log_proba(flat)
            new = constrained(-lp.reshape(g, m, m), perms) if constraint else lp.argmax(1)
            if (new == lab).all():
                break
            lab = new
        res.setdefault(f"purity {name} lda labels", []).append(purity(lab, by[train_sets].ravel()))
        lda = LDA(solver="lsqr", shrinkage="auto").fit(flat, lab)
        for kind, (pt, pq) in (("km", km), ("lda", (lda.predict_proba(bx), lda.predict_proba(qx)))):
            ct = np.asarray(composition_probs(pt[train_sets].astype(np.float32)), np.float64)
            cq = np.asarray(composition_probs(pq[groups.sets].astype(np.float32)), np.float64)
            res.setdefault(f"{name} {kind} -logP(1each)", []).append(auc(-np.log(cq[:, one] + 1e-300), groups.anomaly))
            for k in (2, 20, 100):
                res.setdefault(f"{name} {kind} comp knn{k}", []).append(auc(knn(cq, ct, k), groups.anomaly))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--probe", choices=("pairs", "setkm", "setlda"), required=True)
    ap.add_argument("--phase", choices=("val", "test"), default="val")
    ap.add_argument("--sizes", default="3,5")
    args = ap.parse_args()
    hostmem.keep_freed_memory()
    bx, by, qx, qy = split_views(load_features(args.features), args.phase, 0)
    t0 = time.time()
    for m in (int(s) for s in args.sizes.split(",")):
        res: dict = {}
        for c in range(10):
            classes = [(c + j) % 10 for j in range(m)]
            train_sets, groups = train_test_groups(by, qy, classes, 1000, 500, 500, seed=c)
            normal = np.flatnonzero(np.isin(by, classes))
            if args.probe == "pairs":
                probe_pairs(bx, qx, m, train_sets, groups, normal, res)
            elif args.probe == "setkm":
                probe_setkm(bx, by, qx, m, train_sets, groups, normal, res)
            else:
                probe_setlda(bx, by, qx, m, train_sets, groups, normal, res)
        print(f"M={m} phase={args.phase}", {k: round(100 * float(np.mean(v)), 1) for k, v in res.items()},
              f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
