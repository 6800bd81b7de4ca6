"""Outputs of an evaluation run: results.json (the schema every runner writes), roc.png and scores.png."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax.errors import DN2Error
from dn2_jax.fileio import atomic_write_bytes, atomic_write_json, check_writable


@dataclasses.dataclass
class ClassResult:
    """One normal class (or set configuration): its ROC-AUC and the scores it came from.

    scores: (T,) float64 DN2 scores (mean squared distance to the k nearest), labels: (T,) int64 1 = anomalous.
    """

    name: str
    auc: float
    scores: np.ndarray
    labels: np.ndarray
    bank: int  # bank size (images, or sets in group mode)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    maps: dict[str, Any] | None = None  # level patch: `dn2_jax.patch.maps_figure` arguments of a few test images


def results_dict(settings: dict[str, Any], per_class: list[ClassResult], timings: dict[str, float]) -> dict:
    """The results.json schema: dataset, backbone, k, mode, per_class, mean, settings, timings[, extra].

    `settings` holds at least dataset, backbone, k and mode (an `EvalConfig` as a dict).
    """
    if not per_class:
        raise DN2Error("no classes were evaluated")
    out: dict[str, Any] = {
        "dataset": settings["dataset"],
        "backbone": settings["backbone"],
        "k": settings["k"],
        "mode": settings["mode"],
        "per_class": {r.name: r.auc for r in per_class},
        "mean": float(np.mean([r.auc for r in per_class])),
        "settings": {
            **settings,
            "bank_size_per_class": {r.name: r.bank for r in per_class},
            "n_test": {r.name: int(len(r.labels)) for r in per_class},
        },
        "timings": timings,
    }
    for key in sorted({k for r in per_class for k in r.extra}):
        vals = {r.name: r.extra[key] for r in per_class if key in r.extra}
        out.setdefault("extra", {})[key] = {"per_class": vals, "mean": float(np.mean(list(vals.values())))}
    return out


def check_output_dir(path: str | os.PathLike) -> Path:
    """The absolute output directory, refusing one that cannot be written (a file, a parent that is a file, a
    read-only folder); checked before any work."""
    return check_writable(path, "dir", parents=True, what="output directory")


def write_outputs(out_dir: str | os.PathLike, results: dict, per_class: list[ClassResult]) -> list[Path]:
    """Writes results.json, roc.png and scores.png into out_dir, each atomically (temp file + rename)."""
    out_dir = check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_roc(out_dir / "roc.png", per_class), _plot_hist(out_dir / "scores.png", per_class)]
    atomic_write_json(out_dir / "results.json", results, indent=2, sort_keys=False, default=_jsonable)
    return [out_dir / "results.json", *written]


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> Path:
    """Saves a matplotlib figure as PNG to `path` atomically (rendered in memory, then
    `dn2_jax.fileio.atomic_write_bytes`) and closes it. Returns the absolute path."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **{"dpi": 110, **savefig_kw})
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_roc(path: Path, per_class: list[ClassResult]) -> Path:
    from dn2_jax.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5), layout="constrained")
    for r in per_class:
        fpr, tpr, _ = roc_curve(r.scores, r.labels)
        ax.plot(fpr, tpr, lw=1.2, label=f"{r.name} ({100 * r.auc:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="DN2 ROC per normal class (AUC %)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _plot_hist(path: Path, per_class: list[ClassResult]) -> Path:
    plt = _pyplot()
    n = len(per_class)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax, r in zip(axes.ravel(), per_class, strict=False):
        bins = np.histogram_bin_edges(r.scores, bins=40)
        ax.hist(r.scores[r.labels == 0], bins=bins, alpha=0.6, density=True, label="normal")
        ax.hist(r.scores[r.labels == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
        ax.set_title(f"{r.name} ({100 * r.auc:.1f})", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("DN2 score (mean squared kNN distance): normal vs anomalous", fontsize=9)
    return save_figure(fig, path)
