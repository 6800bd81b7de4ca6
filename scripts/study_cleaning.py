"""Study of unsupervised cleaning (issue 14): paper rule vs the family of dn2_jax.cleaning, on a validation
split carved out of TRAIN (to choose the defaults) and then on TEST (to report).

Protocol (features from scripts/study_features.py: Lite0 224x224, L2-normalised):
  val   banks and contaminants from the train *pool* (train subsample minus the held-out sixth of each class,
        see study_features.validation_split); queries = the held-out train images (normal = class c).
  test  banks and contaminants from the whole train subsample; queries = the test subsample.
For each normal class c and contamination r, the bank is dn2_jax.protocols.contaminated_bank(labels, c, r,
bank_size = the number of pool images of class c, seed = seed + c): round(r * n) images of the other classes,
the rest of class c. The DN2 score uses k = 2 (the paper's) against the kept rows; ROC-AUC per class, mean over
the 10 classes. The DN2 score's k is each rule's (`CleanSettings.score_k_for`: the paper's k = 2, or a share of the
kept rows for 'fixed'); the one-round table scans it (--score-ks).

Leave-one-out and query distances are exact, computed here with NumPy from one distance matrix per bank (the
rules only see them through clean_bank's ``self_score`` callable), which avoids a jit compile per kept-bank
size; the script checks once that they match dn2_jax.knn.self_knn_score.

    python scripts/study_cleaning.py --features /tmp/dn2-study/fashion_mnist-tr600-te2000-s0.npz --phase val
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_features import load_features, split_views  # noqa: E402

from dn2_jax.cleaning import DEFAULT_CLEAN, clean_bank, estimate_contamination, resolve_rule  # noqa: E402
from dn2_jax.knn import self_knn_score  # noqa: E402
from dn2_jax.metrics import roc_auc  # noqa: E402
from dn2_jax.protocols import contaminated_bank  # noqa: E402

SCORE_K = 2


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = (a64 * a64).sum(1)[:, None] - 2 * a64 @ b64.T + (b64 * b64).sum(1)[None]
    return np.maximum(d, 0.0)


class Bank:
    """One contaminated bank with its exact distance matrices; scores subsets without recomputing."""

    def __init__(self, x: np.ndarray, queries: np.ndarray):
        self.x = x
        self.dbb = sq_dists(x, x)
        np.fill_diagonal(self.dbb, np.inf)
        self.dqb = sq_dists(queries, x)
        self._rows: dict[bytes, list[int]] = {}
        for i, r in enumerate(x):  # identical rows (duplicate images) map to their indices in order
            self._rows.setdefault(r.tobytes(), []).append(i)

    def self_score(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Leave-one-out score of ``rows`` (a subset of the bank's rows) among themselves."""
        seen: dict[bytes, int] = {}
        idx = []
        for r in np.asarray(rows):  # clean_bank passes bank[kept] with kept ascending
            key = r.tobytes()
            idx.append(self._rows[key][seen.get(key, 0)])
            seen[key] = seen.get(key, 0) + 1
        idx = np.asarray(idx)
        sub = self.dbb[np.ix_(idx, idx)]
        return np.partition(sub, k - 1, axis=1)[:, :k].mean(1)

    def score(self, kept: np.ndarray, k: int = SCORE_K) -> np.ndarray:
        return np.partition(self.dqb[:, kept], k - 1, axis=1)[:, :k].mean(1)

    def scores(self, kept: np.ndarray, ks) -> dict[int, np.ndarray]:
        """{k: score} for several k from one partial sort of the query distances."""
        near = np.sort(np.partition(self.dqb[:, kept], max(ks) - 1, axis=1)[:, : max(ks)], axis=1)
        means = np.cumsum(near, axis=1) / np.arange(1, max(ks) + 1)
        return {k: means[:, k - 1] for k in ks}


def auc(scores, anomalous) -> float:
    return float(roc_auc(np.asarray(scores, np.float32), np.asarray(anomalous)))


def make_banks(f, phase: str, ratio: float, seed: int):
    bx, by, qx, qy = split_views(f, phase, seed)
    for c in np.unique(by):
        n = int((by == c).sum())
        cb = contaminated_bank(by, int(c), ratio, bank_size=n, n_classes=int(by.max()) + 1, seed=seed + int(c))
        yield int(c), Bank(bx[cb.bank], qx), cb.contaminant, (qy != c).astype(np.int64)


def run(f, phase: str, ratios, methods: dict, seed: int) -> dict:
    """{(method, r): dict(auc, left, kept, est)} averaged over classes."""
    out = {}
    for r in ratios:
        rows = {m: [] for m in methods}
        for _, bank, contaminant, anomalous in make_banks(f, phase, r, seed):
            default_k = resolve_rule(DEFAULT_CLEAN).k_for(len(bank.x))
            est_default = estimate_contamination(bank.self_score(bank.x, default_k))
            for m, kw in methods.items():
                res = clean_bank(bank.x, self_score=bank.self_score, **kw)
                settings = resolve_rule(kw.get("rule", DEFAULT_CLEAN), loo_k=kw.get("loo_k"),
                                        fraction=kw.get("fraction"), rounds=kw.get("rounds"))
                score = bank.score(res.keep, settings.score_k_for(len(res.keep)))
                rows[m].append((auc(score, anomalous), contaminant[res.keep].sum(),
                                len(res.keep), contaminant.sum(),
                                est_default if res.contamination is None else res.contamination))
        for m, v in rows.items():
            est = [e[4] for e in v if e[4] is not None]
            out[(m, r)] = dict(auc=100 * np.mean([e[0] for e in v]), left=np.mean([e[1] for e in v]),
                               kept=np.mean([e[2] for e in v]), had=np.mean([e[3] for e in v]),
                               est=100 * np.mean(est) if est else None)
    return out


def check_scorer(f, seed: int) -> None:
    _, bank, _, _ = next(make_banks(f, "val", 0.1, seed))
    ref = np.asarray(self_knn_score(bank.x, 10))
    np.testing.assert_allclose(bank.self_score(bank.x, 10), ref, rtol=1e-4, atol=1e-5)


def main_table(f, phase, ratios, seed) -> None:
    methods = {"none": dict(rule="none"), "paper": dict(rule="paper"), f"default ({DEFAULT_CLEAN})": {}}
    res = run(f, phase, ratios, methods, seed)
    clean_auc = res[("none", 0.0)]["auc"] if 0.0 in ratios else None
    print(f"\n## Unsupervised cleaning, phase={phase}: mean ROC-AUC over 10 classes (score k: each rule's)")
    if clean_auc is not None:
        print(f"clean bank (r = 0, no cleaning): {clean_auc:.2f}")
    d = resolve_rule(DEFAULT_CLEAN)
    print(f"default = {d.rule!r}: {d.describe()}; estimated contamination = estimate_contamination of the "
          f"default leave-one-out scores of the input bank")
    print("| r | no cleaning | paper (loo k=2, drop 50%) | default | contaminants in bank | left: paper | "
          "left: default | estimated contamination % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ratios:
        n, p, d = (res[(m, r)] for m in methods)
        est = "-" if d["est"] is None else f"{d['est']:.1f}"
        print(f"| {r:g} | {n['auc']:.2f} | {p['auc']:.2f} | {d['auc']:.2f} | {n['had']:.0f} | {p['left']:.1f} | "
              f"{d['left']:.1f} | {est} |")


def estimate_table(f, phase, ratios, seed, ks=(2, 10, 40)) -> None:
    print(f"\n## Contamination estimate (estimate_contamination of the leave-one-out scores), phase={phase}, %")
    print("| r (true %) | " + " | ".join(f"loo k = {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for r in ratios:
        ests = {k: [] for k in ks}
        for _, bank, _, _ in make_banks(f, phase, r, seed):
            for k in ks:
                ests[k].append(estimate_contamination(bank.self_score(bank.x, k)))
        print(f"| {100 * r:g} | " + " | ".join(f"{100 * np.mean(ests[k]):.1f} ± {100 * np.std(ests[k]):.1f}"
                                              for k in ks) + " |")


def ablation(f, phase, ratios, seed, ks, fractions, rounds_list) -> None:
    methods = {("none",): dict(rule="none"), ("paper",): dict(rule="paper")}
    for k, fr, ro in itertools.product(ks, fractions, rounds_list):
        methods[("fixed", k, fr, ro)] = dict(rule="fixed", loo_k=k, fraction=fr, rounds=ro)
    for k, ro in itertools.product(ks, rounds_list):
        methods[("adaptive", k, ro)] = dict(rule="adaptive", loo_k=k, rounds=ro)
    res = run(f, phase, ratios, methods, seed)
    print(f"\n## Ablation, phase={phase}: mean ROC-AUC (contaminants left per bank) by r; last column the mean")
    print("| rule | loo k | fraction | rounds | " + " | ".join(f"r = {r:g}" for r in ratios) + " | mean |")
    print("|---|---|---|---|" + "---|" * (len(ratios) + 1))
    ranked = []
    for m in methods:
        cells = [res[(m, r)] for r in ratios]
        mean = np.mean([c["auc"] for c in cells])
        ranked.append((mean, m))
        name, k, fr, ro = (m + ("-", "-", "-"))[:4] if m[0] != "adaptive" else ("adaptive", m[1], "cap 0.5", m[2])
        print(f"| {name} | {k} | {fr} | {ro} | " + " | ".join(f"{c['auc']:.1f} ({c['left']:.1f})" for c in cells)
              + f" | {mean:.2f} |")
    ranked.sort(reverse=True)
    print("\nbest by mean AUC: " + "; ".join(f"{m} {v:.2f}" for v, m in ranked[:5]))


def one_round_ablation(f, phase, ratios, seed, ks, fractions, score_ks=(SCORE_K,)) -> None:
    """One-round 'fixed' cleaning for many (loo k, fraction, score k) at once: each bank row's sorted distances
    to its max(ks) nearest other rows are computed once, so every k's leave-one-out score is a prefix mean (fast
    on full-size banks, where the grid of `ablation` takes hours); likewise the queries' for every score k."""
    print(f"\n## One-round ablation, phase={phase}: mean ROC-AUC (contaminants left per bank)")
    print("| loo k | drop | score k | " + " | ".join(f"r = {r:g}" for r in ratios) + " | mean |")
    print("|---|---|---|" + "---|" * (len(ratios) + 1))
    res: dict = {}
    kmax = max(ks)
    for r in ratios:
        for _, bank, contaminant, anomalous in make_banks(f, phase, r, seed):
            n = len(bank.x)
            near = np.sort(np.partition(bank.dbb, kmax - 1, axis=1)[:, :kmax], axis=1)
            means = np.cumsum(near, axis=1) / np.arange(1, kmax + 1)
            for sk, s in bank.scores(np.arange(n), score_ks).items():
                res.setdefault(("none", "-", sk, r), []).append((auc(s, anomalous), contaminant.sum()))
            for k in ks:
                for fr in fractions:
                    keep = np.sort(np.argsort(means[:, k - 1], kind="stable")[: n - int(np.floor(fr * n))])
                    for sk, s in bank.scores(keep, score_ks).items():
                        res.setdefault((k, fr, sk, r), []).append((auc(s, anomalous), contaminant[keep].sum()))
    rows = [("none", "-")] + [(k, fr) for k in ks for fr in fractions]
    for (k, fr), sk in itertools.product(rows, score_ks):
        cells = [res[(k, fr, sk, r)] for r in ratios]
        aucs = [100 * np.mean([a for a, _ in c]) for c in cells]
        left = [np.mean([x for _, x in c]) for c in cells]
        drop = "-" if fr == "-" else f"{100 * fr:g}%"
        print(f"| {k} | {drop} | {sk} | " + " | ".join(f"{a:.2f} ({x:.0f})" for a, x in zip(aucs, left, strict=True))
              + f" | {np.mean(aucs):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--phase", choices=("val", "test"), default="val")
    ap.add_argument("--ratios", default="0,0.05,0.1,0.2,0.3")
    ap.add_argument("--tables", default="main,estimate,ablation")
    ap.add_argument("--ablation-ratios", default="0.05,0.1,0.2")
    ap.add_argument("--loo-ks", default="2,5,10,20,40")
    ap.add_argument("--fractions", default="0.2,0.35,0.5,0.65")
    ap.add_argument("--rounds", default="1,2,3")
    ap.add_argument("--one-round-ks", default="2,40,100,200,300,500",
                    help="loo k values of the 'one-round' table (fractions: --fractions)")
    ap.add_argument("--score-ks", default=str(SCORE_K), help="DN2 score k values of the 'one-round' table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    f = load_features(args.features)
    t0 = time.perf_counter()
    check_scorer(f, args.seed)
    sizes = split_views(f, args.phase, args.seed)
    print(f"features {args.features}: phase {args.phase}: bank pool {len(sizes[0])} images "
          f"({len(sizes[0]) // len(np.unique(sizes[1]))} per class), queries {len(sizes[2])}")
    ratios = [float(r) for r in args.ratios.split(",")]
    tables = args.tables.split(",")
    if "main" in tables:
        main_table(f, args.phase, ratios, args.seed)
    if "estimate" in tables:
        estimate_table(f, args.phase, ratios, args.seed)
    if "ablation" in tables:
        ablation(f, args.phase, [float(r) for r in args.ablation_ratios.split(",")], args.seed,
                 [int(k) for k in args.loo_ks.split(",")], [float(x) for x in args.fractions.split(",")],
                 [int(x) for x in args.rounds.split(",")])
    if "one-round" in tables:
        one_round_ablation(f, args.phase, ratios, args.seed, [int(k) for k in args.one_round_ks.split(",")],
                           [float(x) for x in args.fractions.split(",")], [int(x) for x in args.score_ks.split(",")])
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
