"""A detector in use: named image sources, fitting and saving, score reports (JSON / CSV) and the gallery.

What the `dn2 fit` and `dn2 score` commands do, as library calls:

    src = folder_source("bottle/train/good")              # or dataset_source("fashion_mnist", "train", [0])
    det = fit_detector(DetectorConfig(k=2), src, "detectors/bottle")
    report = score_source(Detector.load("detectors/bottle"), folder_source("bottle/test"))
    write_report(report, "scores.csv"); gallery(report, "gallery.png")

Every image has a name: its file path where it has one, else ``SPEC@SPLIT#INDEX`` (e.g.
``fashion_mnist@test#17``), which `load_image` reads back; a detector fitted from a source keeps these
names as its bank paths, so neighbours are reported (and drawn) by name.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax import distributed
from dn2_jax.data import IMAGE_EXTENSIONS, decode_image, load_dataset, open_images, take
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.fileio import atomic_write_text, make_parents

REPORT_FORMATS = (".json", ".csv")


@dataclasses.dataclass(frozen=True)
class Source:
    """Images to fit or score, each with a name.

    images: uint8 (N, H, W[, C]) or a list of N arrays of any sizes; None when `store` holds the features.
    names: N names (file paths, or ``SPEC@SPLIT#INDEX``).
    store: an embedding store's path (features already extracted), else None.
    labels: (N,) int64 class labels where known, else None.
    skipped: (path, reason) of each image file left out because it could not be decoded (on_error="skip").
    """

    images: Any
    names: Sequence[str]
    store: Path | None = None
    labels: np.ndarray | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.names)


def dataset_ref(spec: str, split: str, index: int) -> str:
    """The name of image `index` of a dataset split that has no files: ``SPEC@SPLIT#INDEX``."""
    return f"{spec}@{split}#{int(index)}"


def _parse_ref(name: str) -> tuple[str, str, int] | None:
    head, sep, index = name.rpartition("#")
    spec, at, split = head.rpartition("@")
    if not (sep and at and spec and split and index.isdigit()):
        return None
    return spec, split, int(index)


def load_image(name: str, data_dir: str | None = None) -> np.ndarray:
    """The uint8 image a `Source` name refers to: a file path, or ``SPEC@SPLIT#INDEX``."""
    if os.path.isfile(name):
        return decode_image(name)
    ref = _parse_ref(name)
    if ref is None:
        raise DN2FileError(f"image '{name}' does not exist")
    spec, split, index = ref
    ds = load_dataset(spec, split, data_dir)
    if not 0 <= index < len(ds):
        raise DN2FileError(f"image '{name}': {spec} ({split}) has {len(ds)} images")
    return np.asarray(ds.images[index])


def folder_source(directory: str | os.PathLike, *, on_error: str = "raise") -> Source:
    """Every image file under `directory` (recursively, sorted), named by its path as given.

    on_error: "raise" stops at the first file that cannot be decoded, naming it; "skip" leaves such files out
    and lists them in `Source.skipped` (`dn2_jax.data.open_images`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DN2FileError(f"--images '{directory}' is not a directory")
    paths = sorted(str(p) for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DN2FileError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{directory}'")
    images, skipped = open_images(paths, on_error=on_error)  # decoded as they are embedded
    kept = images.paths
    if not kept:
        raise DN2FileError(f"none of the {len(paths)} image files under '{directory}' decodes ({skipped[0][1]})")
    return Source(images, kept, skipped=skipped)


def dataset_source(spec: str, split: str, classes: Sequence[int] | None = None,
                   data_dir: str | None = None, *, on_error: str = "raise") -> Source:
    """Images of a dataset split (only those of `classes` if given), named by file path where the dataset
    has files, else ``SPEC@SPLIT#INDEX``. on_error: as `dn2_jax.data.load_dataset` (image-file datasets);
    files left out are listed in `Source.skipped`."""
    ds = load_dataset(spec, split, data_dir, on_error=on_error)
    idx = np.arange(len(ds))
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < len(ds.class_names)]
        if bad:
            raise DN2Error(f"class {bad[0]} does not exist in {spec}: it has classes 0..{len(ds.class_names) - 1}")
        idx = np.flatnonzero(np.isin(ds.labels, list(classes)))
    if len(idx) == 0:
        raise DN2Error(f"{spec} ({split}) has no images of classes {list(classes or [])}")
    images = take(ds.images, idx)  # lazy for image folders: decoded as they are embedded
    names = [ds.paths[i] for i in idx] if ds.paths is not None else [dataset_ref(spec, split, i) for i in idx]
    return Source(images, names, labels=ds.labels[idx], skipped=ds.skipped)


def store_source(path: str | os.PathLike) -> Source:
    """An embedding store (`dn2 embed` output); its rows are named ``DATASET@SPLIT#ID`` from its metadata."""
    from dn2_jax import store

    path = Path(path).absolute()
    st = store.open_store(path)
    meta = st.metadata
    names = [dataset_ref(meta["dataset"], meta["split"], i) for i in st.ids]
    return Source(None, names, store=path, labels=st.labels)


def store_config(path: str | os.PathLike, **settings: Any):
    """The `DetectorConfig` of the features in store `path` (backbone, input size and compute dtype from its
    metadata), with `settings`; a setting that contradicts the store raises DN2Error naming both."""
    from dn2_jax import store
    from dn2_jax.detector import DetectorConfig

    meta = store.open_store(Path(path).absolute()).metadata
    derived = {"backbone": meta["backbone"], "input_size": meta.get("input_size"),
               "dtype": meta.get("compute_dtype", "float32")}
    for key, value in derived.items():
        if key in settings and settings[key] != value:
            raise DN2Error(f"--{key.replace('_', '-')} {settings[key]} contradicts store '{path}', which holds "
                           f"{key}={value!r} features")
    return DetectorConfig(**{**derived, **settings})


def check_new_output(path: str | os.PathLike, what: str, *, overwrite: bool = False,
                     suffixes: Sequence[str] | None = None) -> Path:
    """Checks, before any compute, that `path` can be written: the right suffix, not an existing directory
    (unless `what` is one and `overwrite`), and its nearest existing parent a writable directory."""
    path = Path(path)
    if suffixes is not None and path.is_dir():
        raise DN2Error(f"{what} '{path}' is a directory")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise DN2Error(f"{what} '{path}' must end in {' or '.join(suffixes)}")
    if path.exists() and suffixes is None and not overwrite:
        raise DN2Error(f"{what} '{path}' already exists; pass --overwrite to replace it")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DN2Error(f"{what} '{path}' cannot be written: '{parent}' is not a writable directory")
    return path


def fit_detector(config, source: Source, out: str | os.PathLike | None = None, *, overwrite: bool = False):
    """A `Detector` with `config`, fitted to `source` (bank paths = its names, absolute for files), saved to
    `out` if given (checked before the fit). In a multi-process job each process embeds its share of the images
    and process 0 saves."""
    from dn2_jax.detector import Detector

    if out is not None:
        check_new_output(out, "--out", overwrite=overwrite)
    names = [os.path.abspath(n) if os.path.isfile(n) else n for n in source.names]
    det = Detector(config)
    if source.store is None and distributed.process_count() > 1:  # each process embeds its share
        det.fit_features(distributed.embed_shares(lambda x: det.embed(x, raw=True), source.images), paths=names)
    else:
        det.fit(source.store if source.store is not None else source.images, paths=names)
    if out is not None and distributed.is_writer():
        det.save(out, overwrite=overwrite)
    distributed.barrier("dn2-fit-saved")
    return det


def load_detector(path: str | os.PathLike, **overrides: Any) -> tuple[Any, str | None]:
    """(`Detector.load(path, **overrides)`, a note or None). With a `k` other than the one the detector was
    fitted at, its threshold and p-values are recomputed for that k (leave-one-out on its bank), and the
    note says so."""
    from dn2_jax.detector import Detector

    fitted_k = Detector.saved_config(path).k
    det = Detector.load(path, **overrides)
    if det.config.k == fitted_k:
        return det, None
    fitted = f"k={fitted_k}" if fitted_k is not None else "its cleaning rule's k (a share of its bank)"
    return det, (f"the detector was fitted at {fitted}; its threshold and p-values are recomputed for "
                 f"k={det.k} (leave-one-out on its bank)")


@dataclasses.dataclass(frozen=True)
class ScoreReport:
    """Scores of a source by a detector: per image its name and `query` fields (see `Detector.query`)."""

    names: Sequence[str]
    query: Any  # dn2_jax.detector.Query
    k: int
    fpr: float
    threshold: float
    source: Source

    def summary(self) -> dict[str, Any]:
        """{"images", "anomalous", "normal", "skipped", "k", "fpr", "threshold"}; skipped: image files of the
        source left out as undecodable (not scored)."""
        n_bad = int(np.sum(self.query.anomalous))
        return {"images": len(self.names), "anomalous": n_bad, "normal": len(self.names) - n_bad,
                "skipped": len(self.source.skipped), "k": self.k, "fpr": self.fpr, "threshold": self.threshold}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: id, score, p_value, anomalous, neighbours [{id, sq_dist}] (nearest first)."""
        q = self.query
        return [{"id": name, "score": float(q.scores[i]), "p_value": float(q.p_values[i]),
                 "anomalous": bool(q.anomalous[i]),
                 "neighbours": [{"id": _plain(n), "sq_dist": float(d)}
                                for n, d in zip(q.neighbours[i], q.neighbour_sq_dists[i], strict=True)]}
                for i, name in enumerate(self.names)]


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def score_source(det, source: Source) -> ScoreReport:
    """Scores, p-values, decisions and the k nearest bank images of every image of `source` (in a multi-process
    job each process embeds its share of the images; every process returns the whole report)."""
    if source.store is None and distributed.process_count() > 1:  # each process embeds its share
        query = det.query_features(distributed.embed_shares(lambda x: det.embed(x, raw=True), source.images))
    else:
        query = det.query(source.store if source.store is not None else source.images)
    return ScoreReport(list(source.names), query, det.k, det.config.fpr, det.threshold, source)


def format_report(report: ScoreReport, limit: int | None = None) -> str:
    """Human-readable lines: score, p-value, decision, name and nearest neighbour; then the summary."""
    lines = []
    for row in report.rows()[:limit]:
        nearest = row["neighbours"][0]
        flag = "ANOMALOUS" if row["anomalous"] else "normal"
        lines.append(f"{row['score']:.6g}  p={row['p_value']:.3f}  {flag:<9}  {_display(row['id'])}  "
                     f"(nearest normal: {_display(nearest['id'])}, d²={nearest['sq_dist']:.4g})")
    s = report.summary()
    skipped = f", {s['skipped']} undecodable files skipped" if s["skipped"] else ""
    lines.append(f"{s['images']} images: {s['anomalous']} anomalous, {s['normal']} normal{skipped} (threshold "
                 f"{s['threshold']:.6g} at target FPR {s['fpr']}, k={s['k']})")
    return "\n".join(lines)


def write_report(report: ScoreReport, path: str | os.PathLike, detector: str | None = None) -> Path:
    """Writes the report as JSON ({"detector", "summary", "scores": rows, "skipped": [{path, reason}]}) or CSV
    (one row per image: id, score, p_value, anomalous, neighbour_1, sq_dist_1, ...; skipped files are not
    rows), by the suffix of `path`; atomically."""
    path = check_new_output(path, "--out", suffixes=REPORT_FORMATS)
    if path.suffix.lower() == ".json":
        skipped = [{"path": p, "reason": r} for p, r in report.source.skipped]
        text = json.dumps({"detector": detector, "summary": report.summary(), "scores": report.rows(),
                           "skipped": skipped}, indent=1)
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "score", "p_value", "anomalous"]
                   + [f"{c}_{j + 1}" for j in range(report.k) for c in ("neighbour", "sq_dist")])
        for row in report.rows():
            w.writerow([row["id"], repr(row["score"]), repr(row["p_value"]), int(row["anomalous"])]
                       + [v for n in row["neighbours"] for v in (n["id"], repr(n["sq_dist"]))])
        text = buf.getvalue()
    make_parents(path)
    return atomic_write_text(path, text)


def gallery(report: ScoreReport, path: str | os.PathLike, *, top: int = 8, data_dir: str | None = None) -> Path:
    """A PNG: the `top` most anomalous images (rows, highest score first), each beside its k nearest normal
    images with their squared distances."""
    path = check_new_output(path, "--gallery", suffixes=(".png",))
    if report.source.images is None:
        raise DN2Error("--gallery needs the images themselves (--images or --dataset), not a store of features")
    if not (isinstance(top, int) and top >= 1):
        raise DN2Error(f"--top must be a positive integer, got {top!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dn2_jax.evaluation.report import save_figure

    rows = report.rows()
    order = np.argsort(-report.query.scores, kind="stable")[:top]
    cols = 1 + report.k
    fig, axes = plt.subplots(len(order), cols, figsize=(1.9 * cols, 2.1 * len(order)), squeeze=False,
                             layout="constrained")
    for r, i in enumerate(order):
        row = rows[i]
        title = f"{_short(_display(row['id']))}\nscore {row['score']:.3g}, p {row['p_value']:.2g}"
        panels = [(report.source.images[i], title)]
        for n in row["neighbours"]:
            try:
                image = load_image(str(n["id"]), data_dir)
            except (DN2Error, DN2FileError):
                image = None  # e.g. a bank fitted from arrays without names: the id is shown alone
            panels.append((image, f"{_short(_display(n['id']))}\nd² {n['sq_dist']:.3g}"))
        for c, (image, title) in enumerate(panels):
            ax = axes[r, c]
            if image is not None:
                ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None, vmin=0, vmax=255)
            ax.set_title(title, fontsize=6, color="crimson" if c == 0 and row["anomalous"] else "black")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[-1, 0].set_xlabel("query", fontsize=7)
    for c in range(1, cols):
        axes[-1, c].set_xlabel(f"nearest normal #{c}", fontsize=7)
    fig.suptitle("most anomalous images (left) and their nearest normal images", fontsize=8)
    make_parents(path)
    return save_figure(fig, path)


def _display(name: Any) -> str:
    """A name as printed: a path under the working directory relative to it."""
    name = str(name)
    if os.path.isabs(name) and not os.path.relpath(name).startswith(".."):
        return os.path.relpath(name)
    return name


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
