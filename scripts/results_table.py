#!/usr/bin/env python
"""Prints the README's Results tables (markdown) from the results.json files written by scripts/results.sh.

Usage: .venv/bin/python scripts/results_table.py [RUNS_DIR]   (default runs/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
PAPER_FMNIST = 94.4  # DN2 paper, Fashion-MNIST, ResNet, k = 2


def load(name: str) -> dict | None:
    path = RUNS / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def one_class() -> None:
    for ds, title in (("fashion_mnist", "Fashion-MNIST"), ("mnist", "MNIST")):
        cols = [(f"{ds}-lite0-224", "Lite0 224², L2 (default)"), (f"{ds}-lite0-224-raw", "Lite0 224², raw"),
                (f"{ds}-lite0-112", "Lite0 112², L2"), (f"{ds}-lite0-112-raw", "Lite0 112², raw"),
                (f"{ds}-pixels", "raw pixels")]
        runs = [(load(name), label) for name, label in cols]
        runs = [(r, label) for r, label in runs if r]
        if not runs:
            continue
        print(f"\n**{title}**, one-class ROC-AUC (%), k = 2, full splits\n")
        print("| class | " + " | ".join(label for _, label in runs) + " |")
        print("|---|" + "---|" * len(runs))
        for cls in runs[0][0]["per_class"]:
            print(f"| {cls} | " + " | ".join(pct(r["per_class"].get(cls)) for r, _ in runs) + " |")
        print("| **mean** | " + " | ".join(f"**{pct(r['mean'])}**" for r, _ in runs) + " |")
        if ds == "fashion_mnist":
            print(f"\nDN2 paper (ResNet, Fashion-MNIST): {PAPER_FMNIST}.")


def unsupervised() -> None:
    rows = [(r, load(f"unsup-r{r}")) for r in ("0", "0.05", "0.1", "0.2")]
    rows = [(r, res) for r, res in rows if res]
    if not rows:
        return
    print("\n**Unsupervised** (Fashion-MNIST, contaminated banks, k = 2), mean ROC-AUC (%); contaminants left "
          "after cleaning; contamination estimated by the default rule\n")
    print("| contamination r | no cleaning | paper's cleaning | default cleaning | left (paper) | left (default) "
          "| estimated |")
    print("|---|---|---|---|---|---|---|")
    for r, res in rows:
        ex = res["extra"]

        def left(key, ex=ex):
            value = ex.get(key, {}).get("mean")
            return "—" if value is None else f"{value:.0f} of {ex['contaminants']['mean']:.0f}"

        paper = ex.get("auc_paper_cleaning", {}).get("mean")
        estimate = ex.get("contamination_estimated", {}).get("mean")
        print(f"| {r} | {pct(ex['auc_without_cleaning']['mean'])} | {'—' if paper is None else pct(paper)} | "
              f"{pct(res['mean'])} | {left('contaminants_after_paper_cleaning')} | "
              f"{left('contaminants_after_cleaning')} | {'—' if estimate is None else f'{estimate:.3f}'} |")


def group() -> None:
    res = load("group-m3")
    if not res:
        return
    pool = res["settings"].get("group_pool", "mean")
    print("\n**Group anomaly detection** (Fashion-MNIST, sets of 3), ROC-AUC (%)\n")
    print(f"| classes in a set | group DN2 ({pool} pool) | group DN2 (mean pool, the paper's) | pointwise (mean of "
          "per-image scores) |")
    print("|---|---|---|---|")
    point = res["extra"]["auc_pointwise"]["per_class"]
    mean_pool = res["extra"].get("auc_mean_pool", {"per_class": res["per_class"], "mean": res["mean"]})
    for cls, auc in res["per_class"].items():
        print(f"| {cls} | {pct(auc)} | {pct(mean_pool['per_class'][cls])} | {pct(point[cls])} |")
    print(f"| **mean** | **{pct(res['mean'])}** | **{pct(mean_pool['mean'])}** | "
          f"**{pct(res['extra']['auc_pointwise']['mean'])}** |")


def ablations() -> None:
    ks = [(k, load(f"ablation-k{k}")) for k in (1, 2, 5, 10, 50)]
    ks = [(k, r) for k, r in ks if r]
    if ks:
        print("\n**k** (Fashion-MNIST, full splits): " + ", ".join(f"k={k}: {pct(r['mean'])}" for k, r in ks))
    banks = [(n, load(f"ablation-bank{n}")) for n in (10, 100, 1000)]
    banks += [("all (6000)", load("fashion_mnist-lite0-224"))]
    banks = [(n, r) for n, r in banks if r]
    if banks:
        print("\n**Bank size** per class (Fashion-MNIST, all 10k test images): "
              + ", ".join(f"{n}: {pct(r['mean'])}" for n, r in banks))
    res = [(name, load(name)) for name in ("res-224", "res-224-raw", "res-112", "res-112-raw")]
    res = [(n, r) for n, r in res if r]
    if res:
        print("\n**Resolution and normalisation** (Fashion-MNIST, 200 train images per class, 2000 test):\n")
        print("| input | features | mean ROC-AUC |")
        print("|---|---|---|")
        for name, r in res:
            size = name.split("-")[1]
            norm = "raw" if name.endswith("raw") else "L2"
            print(f"| {size}² | {norm} | {pct(r['mean'])} |")


if __name__ == "__main__":
    one_class()
    unsupervised()
    group()
    ablations()
