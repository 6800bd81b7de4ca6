"""Probe behind the README's "re-admitting the dropped rows" figures (issue 14), NOT a library rule: after the
default cleaning (leave-one-out k = 10% of the bank, drop 50%), re-admit each dropped row whose score against the
kept rows (mean squared distance to its k' nearest kept rows; k' = 50 or 10% of the kept rows) is at most the
q-quantile of the kept rows' own leave-one-out scores times a factor. Banks, queries and scoring (k = 2) as in
scripts/study_cleaning.py.

    python scripts/probe_readmission.py --features /work/cache/study/fashion_mnist-tr0-te0-s0.npz --ratios 0,0.05
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_cleaning import auc, make_banks  # noqa: E402
from study_features import load_features  # noqa: E402


def kmean(d, k):
    return np.partition(d, k - 1, axis=1)[:, :k].mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True)
    ap.add_argument("--phase", choices=("val", "test"), default="val")
    ap.add_argument("--ratios", default="0,0.05,0.1,0.2,0.3")
    args = ap.parse_args()
    f = load_features(args.features)
    t0 = time.time()
    for r in [float(v) for v in args.ratios.split(",")]:
        res: dict = {}
        for _, bank, cont, anom in make_banks(f, args.phase, r, 0):
            n, d = len(bank.x), bank.dbb
            order = np.argsort(kmean(d, max(1, int(0.1 * n))), kind="stable")
            kept, dropped = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
            res.setdefault("default (drop 50%)", []).append((auc(bank.score(kept), anom), cont[kept].sum(), len(kept)))
            for kp in (50, "10%"):
                kk = max(1, int(0.1 * len(kept))) if kp == "10%" else kp
                own, other = kmean(d[np.ix_(kept, kept)], kk), kmean(d[np.ix_(dropped, kept)], kk)
                for q in (0.99, 1.0):
                    for factor in (1.0, 1.25, 1.5):
                        final = np.sort(np.r_[kept, dropped[other <= np.quantile(own, q) * factor]])
                        res.setdefault(f"k'={kp} q={q} x{factor}", []).append(
                            (auc(bank.score(final), anom), cont[final].sum(), len(final)))
        print(f"r={r} ({time.time() - t0:.0f} s)", flush=True)
        for name, v in res.items():
            v = np.array(v, float)
            print(f"  {name:22s} ROC-AUC {100 * v[:, 0].mean():.2f}  contaminants left {v[:, 1].mean():.1f}"
                  f"  kept {v[:, 2].mean():.0f}", flush=True)


if __name__ == "__main__":
    main()
