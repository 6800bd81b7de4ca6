"""The paper's evaluation protocol end to end: data -> features (cached in stores) -> DN2 scores -> ROC-AUC.

Modes (``EvalConfig.mode``):
  semi          one-class / unimodal: class c is normal, its train images are the bank, every test image is
                scored, other classes are anomalies (MVTec-style folders: train/good vs test/*).
  unsupervised  the bank of class c is contaminated with a share r of other classes; the cleaning stage drops
                ``clean_fraction`` of it by leave-one-out kNN score before scoring. Reports both.
  group         sets of M images (paper 3.3): group DN2 on mean-pooled set features vs the pointwise
                baseline (mean of per-image DN2 scores over the set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax import protocols
from dn2_jax.data import Dataset, load_dataset
from dn2_jax.errors import DN2Error
from dn2_jax.knn import clean, knn_score, l2_normalize, pool_groups
from dn2_jax.metrics import roc_auc

MODES = ("semi", "unsupervised", "group")
PIXELS = "pixels"  # raw-pixel baseline: the image itself, flattened, in [0, 1], through the same kNN path.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (plain data; saved in results.json)."""

    dataset: str = "fashion_mnist"
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    mode: str = "semi"
    k: int = 2
    classes: tuple[int, ...] | None = None  # normal classes to evaluate; None = all
    bank_size: int | None = None  # train images per bank (subsample); None = all
    test_size: int | None = None  # test images (class-stratified subsample); None = all
    contamination: float = 0.0  # unsupervised: share of other-class images in the bank
    clean_fraction: float = 0.5  # unsupervised: share of the bank dropped by the cleaning stage
    group_size: int = 3  # group: images per set (M)
    train_groups: int = 200  # group: normal train sets (the bank)
    test_groups: int = 200  # group: test sets, half normal, half anomalous
    batch_size: int = 64
    dtype: str = "float32"
    input_size: int | None = None  # backbone input resolution; None = the backbone's preset
    normalize: bool = True  # L2-normalise features before kNN (better on Fashion-MNIST/MNIST; see README)
    seed: int = 0
    data_dir: str | None = None
    cache_dir: str | None = None  # embedding stores; None = no caching


@dataclasses.dataclass
class ClassResult:
    name: str
    auc: float
    scores: np.ndarray
    labels: np.ndarray
    bank: int  # bank size (images, or sets in group mode)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- checks


def validate_config(cfg: EvalConfig) -> None:
    """Raises DN2Error for settings that can be judged without loading anything."""
    if cfg.mode not in MODES:
        raise DN2Error(f"unknown mode '{cfg.mode}'; choose one of {', '.join(MODES)}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise DN2Error(f"dtype must be float32 or bfloat16, got '{cfg.dtype}'")
    if cfg.backbone != PIXELS:
        from dn2_jax.models import get_backbone

        get_backbone(cfg.backbone)  # unknown name -> DN2Error listing the known ones
    for name in ("k", "batch_size", "group_size", "train_groups", "test_groups"):
        if int(getattr(cfg, name)) < 1:
            raise DN2Error(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("bank_size", "test_size", "input_size"):
        value = getattr(cfg, name)
        if value is not None and int(value) < 1:
            raise DN2Error(f"{name} must be >= 1, got {value}")
    if not 0.0 <= cfg.contamination < 1.0:
        raise DN2Error(f"contamination must be in [0, 1), got {cfg.contamination}")
    if cfg.mode == "unsupervised" and not 0.0 <= cfg.clean_fraction < 1.0:
        raise DN2Error(f"clean_fraction must be in [0, 1) (0 = no cleaning), got {cfg.clean_fraction}")
    if cfg.mode == "group" and cfg.group_size < 2:
        raise DN2Error(f"group_size must be >= 2, got {cfg.group_size}")
    if cfg.dataset.startswith("mvtec:") and cfg.mode != "semi":
        raise DN2Error(f"mode '{cfg.mode}' is not defined for MVTec-style folders; use --mode semi")


def _check_k_fits(k: int, bank: int, what: str) -> None:
    if k > bank:
        raise DN2Error(f"k={k} is larger than the bank ({bank} images {what}); lower --k or raise --bank-size")


# ------------------------------------------------------------------------------------------------- features


class FeatureExtractor:
    """Embeds subsets of a dataset split with one backbone, caching each subset in an embedding store."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        if cfg.backbone == PIXELS:
            self.identity = {"backbone": PIXELS, "fingerprint": "none", "preset": "pixels/255"}
            self.embed_batch = _pixels
            self._embed_images = None
        else:
            import jax.numpy as jnp

            from dn2_jax.convert import load_variables
            from dn2_jax.embedding import embed, make_embed_fn
            from dn2_jax.models import fingerprint, get_backbone

            spec = get_backbone(cfg.backbone)
            variables = load_variables(cfg.backbone, cfg.weights)
            dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
            preset = spec.preset if cfg.input_size is None else spec.preset.at_size(cfg.input_size)
            self.identity = {
                "backbone": cfg.backbone,
                "fingerprint": fingerprint(variables),
                "preset": json.dumps(dataclasses.asdict(preset), sort_keys=True),
            }
            kw = dict(batch_size=cfg.batch_size, dtype=dtype, input_size=cfg.input_size)
            self.embed_batch = make_embed_fn(spec, variables, **kw)
            self._embed_images = lambda images: embed(images, spec, variables, **kw)

    def __call__(self, ds: Dataset, indices: np.ndarray) -> np.ndarray:
        """(len(indices), D) float32 features of ``ds.images[indices]`` (L2-normalised if configured)."""
        indices = np.asarray(indices, np.int64)
        feats = self._features(ds, indices)
        if self.cfg.normalize:
            feats = np.asarray(l2_normalize(feats))
        return feats

    def _features(self, ds: Dataset, indices: np.ndarray) -> np.ndarray:
        if self.cfg.cache_dir is None or self.cfg.backbone == PIXELS:
            return self.embed_all(_take(ds.images, indices))
        from dn2_jax import store

        meta = {**self.identity, "dataset": self.cfg.dataset, "split": ds.split, "compute_dtype": self.cfg.dtype}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{ds.name}-{ds.split}-{self.cfg.backbone}")
        folder = Path(self.cfg.cache_dir) / f"{safe}-{key}"
        # Any complete store of the same images/backbone/preset that holds every requested image will do.
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith("."):  # a writer's lock file or temporary directory
                continue
            try:
                st = store.open_store(path, expect=meta)
            except store.IncompleteStoreError:
                continue  # resumed below if it is the one this request needs
            pos = _positions(st.ids, indices)
            if pos is not None:
                return st.embeddings()[pos]
        path = folder / hashlib.sha256(indices.tobytes()).hexdigest()[:16]
        images, labels = _take(ds.images, indices), ds.labels[indices]
        if isinstance(images, np.ndarray):  # resumable, chunk by chunk
            st = store.extract_to_store(path, images, self.embed_batch, metadata=meta, labels=labels, ids=indices,
                                        batch_size=self.cfg.batch_size)
        else:
            st = store.write_store(path, self.embed_all(images), metadata=meta, labels=labels, ids=indices)
        return st.embeddings()

    def embed_all(self, images) -> np.ndarray:
        """(N, D) float32 features of N images (an array, or a list of arrays of any sizes)."""
        if self._embed_images is None:
            return self.embed_batch(images)
        return np.asarray(self._embed_images(images), np.float32)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """Positions of `wanted` in `ids`, or None if some are missing."""
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    found = order[pos]
    return found if np.array_equal(ids[found], wanted) else None


def _pixels(images) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise DN2Error("the raw-pixel baseline needs images of one size")
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _take(images, indices: np.ndarray):
    if isinstance(images, np.ndarray):
        return images[indices]
    return [images[int(i)] for i in indices]


class _Log:
    def __init__(self, printer: Callable[[str], None] | None):
        self.print = printer or (lambda s: None)
        self.timings: dict[str, float] = {}

    def timing(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)

    def row(self, res: ClassResult) -> None:
        extra = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.extra.items())
        self.print(f"  {res.name:<32} ROC-AUC {100 * res.auc:6.2f}   bank {res.bank:>6}   {extra}")


# -------------------------------------------------------------------------------------------------- modes


def _embedder(extract: FeatureExtractor, log: _Log, ds: Dataset, index_sets) -> Callable[[np.ndarray], np.ndarray]:
    """Embeds the union of `index_sets` of `ds` once (timed); returns a lookup indices (any shape) -> features."""
    pool = np.unique(np.concatenate([np.ravel(s) for s in index_sets]))
    t0 = time.perf_counter()
    feats = extract(ds, pool)
    log.timing("embed_s", time.perf_counter() - t0)
    return lambda idx: feats[np.searchsorted(pool, idx)]


def _score(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(knn_score(queries, bank, k), np.float64)


def _auc(scores, labels) -> float:
    return float(roc_auc(np.asarray(scores, np.float32), labels))


def _classes(cfg: EvalConfig, n_classes: int, class_names: Sequence[str]) -> list[int]:
    if cfg.classes is None:
        return list(range(n_classes))
    bad = [c for c in cfg.classes if not 0 <= c < n_classes]
    if bad:
        raise DN2Error(
            f"class {bad[0]} does not exist in {cfg.dataset}: it has {n_classes} classes, 0..{n_classes - 1} "
            f"({', '.join(class_names[:4])}, ...)"
        )
    return list(cfg.classes)


def _run_semi(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    n_classes = len(train.class_names)
    if cfg.dataset.startswith("mvtec:"):
        splits = {0: protocols.mvtec_split(train.labels, test.labels)}
        names = {0: cfg.dataset.split(":", 1)[1].rstrip("/").split("/")[-1]}
    else:
        kw = dict(bank_size=cfg.bank_size, test_size=cfg.test_size, n_classes=n_classes, seed=cfg.seed)
        splits = {c: protocols.one_class(train.labels, test.labels, c, **kw) for c in classes}
        names = {c: train.class_names[c] for c in classes}
    for c, split in splits.items():
        _check_k_fits(cfg.k, len(split.bank), f"of class '{names[c]}'")
    train_of = _embedder(extract, log, train, [s.bank for s in splits.values()])
    test_of = _embedder(extract, log, test, [s.test for s in splits.values()])
    for c, split in splits.items():
        scores = _score(test_of(split.test), train_of(split.bank), cfg.k)
        yield ClassResult(names[c], _auc(scores, split.test_anomaly), scores, split.test_anomaly, len(split.bank))


def _run_unsupervised(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    n_classes = len(train.class_names)
    banks = {
        c: protocols.contaminated_bank(
            train.labels, c, cfg.contamination, bank_size=cfg.bank_size, n_classes=n_classes, seed=cfg.seed
        )
        for c in classes
    }
    tests = {
        c: protocols.one_class(train.labels, test.labels, c, test_size=cfg.test_size, bank_size=1,
                               n_classes=n_classes, seed=cfg.seed)
        for c in classes
    }
    for c, b in banks.items():
        n = len(b.bank)
        kept = n - int(np.floor(cfg.clean_fraction * n))
        _check_k_fits(cfg.k, kept, f"left of class '{train.class_names[c]}' after cleaning")
        if cfg.clean_fraction > 0 and cfg.k > n - 1:
            raise DN2Error(f"k={cfg.k} needs a bank of at least {cfg.k + 1} images for cleaning, got {n}")
    train_of = _embedder(extract, log, train, [b.bank for b in banks.values()])
    test_of = _embedder(extract, log, test, [t.test for t in tests.values()])
    for c in classes:
        b, t = banks[c], tests[c]
        bank, queries = train_of(b.bank), test_of(t.test)
        raw = _score(queries, bank, cfg.k)
        extra = {"auc_without_cleaning": _auc(raw, t.test_anomaly), "contaminants": int(b.contaminant.sum())}
        scores = raw
        if cfg.clean_fraction > 0:
            kept = np.asarray(clean(bank, cfg.k, cfg.clean_fraction))
            extra["contaminants_after_cleaning"] = int(b.contaminant[kept].sum())
            scores = _score(queries, bank[kept], cfg.k)
        yield ClassResult(train.class_names[c], _auc(scores, t.test_anomaly), scores, t.test_anomaly, len(b.bank),
                          extra)


def _run_group(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    n_classes = len(train.class_names)
    if cfg.group_size > n_classes:
        raise DN2Error(f"group_size={cfg.group_size} exceeds the {n_classes} classes of {cfg.dataset}")
    _check_k_fits(cfg.k, cfg.train_groups, "of normal train sets")
    n_norm = cfg.test_groups // 2
    configs = {}
    for c in classes:
        group_classes = [(c + j) % n_classes for j in range(cfg.group_size)]
        configs[c] = (group_classes, *protocols.train_test_groups(
            train.labels, test.labels, group_classes, cfg.train_groups, n_norm, cfg.test_groups - n_norm,
            seed=cfg.seed + c,
        ))
    train_of = _embedder(extract, log, train, [s for _, s, _ in configs.values()])
    test_of = _embedder(extract, log, test, [g.sets for _, _, g in configs.values()])
    for group_classes, train_sets, groups in configs.values():
        tr, te = train_of(train_sets), test_of(groups.sets)  # (G, M, D)
        scores = _score(np.asarray(pool_groups(te)), np.asarray(pool_groups(tr)), cfg.k)
        # Pointwise baseline: each test image against the individual train images, averaged over the set.
        point_bank = train_of(np.unique(train_sets))
        flat = _score(te.reshape(-1, te.shape[-1]), point_bank, cfg.k).reshape(te.shape[:2])
        extra = {"auc_pointwise": _auc(flat.mean(1), groups.anomaly)}
        name = "+".join(train.class_names[g] for g in group_classes)
        yield ClassResult(name, _auc(scores, groups.anomaly), scores, groups.anomaly, len(train_sets), extra)


# --------------------------------------------------------------------------------------------------- runner


def evaluate(cfg: EvalConfig, printer: Callable[[str], None] | None = print) -> tuple[dict, list[ClassResult]]:
    """Runs the protocol; returns (results dict as written to results.json, per-class results)."""
    validate_config(cfg)
    log = _Log(printer)
    t_start = time.perf_counter()
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    log.timing("load_s", time.perf_counter() - t_start)
    classes = _classes(cfg, len(train.class_names), train.class_names)
    if cfg.backbone == PIXELS and not isinstance(train.images, np.ndarray):
        raise DN2Error("the raw-pixel baseline needs images of one size; this dataset mixes sizes")
    t0 = time.perf_counter()
    extract = FeatureExtractor(cfg)
    log.timing("load_s", time.perf_counter() - t0)
    run = {"semi": _run_semi, "unsupervised": _run_unsupervised, "group": _run_group}[cfg.mode]
    log.print(f"DN2 {cfg.mode} on {cfg.dataset} with {cfg.backbone}, k={cfg.k}")
    # Runners validate, embed (timed as embed_s) and then yield one result per class as it is scored.
    results, t0, embed_before = [], time.perf_counter(), log.timings.get("embed_s", 0.0)
    for res in run(cfg, train, test, classes, extract, log):
        log.row(res)
        results.append(res)
    log.timing("score_s", time.perf_counter() - t0 - (log.timings.get("embed_s", 0.0) - embed_before))
    log.timing("total_s", time.perf_counter() - t_start)
    mean = float(np.mean([r.auc for r in results]))
    log.print(f"  {'mean':<32} ROC-AUC {100 * mean:6.2f}")
    out: dict[str, Any] = {
        "dataset": cfg.dataset,
        "backbone": cfg.backbone,
        "k": cfg.k,
        "mode": cfg.mode,
        "per_class": {r.name: r.auc for r in results},
        "mean": mean,
        "settings": {
            **dataclasses.asdict(cfg),
            "bank_size_per_class": {r.name: r.bank for r in results},
            "n_test": {r.name: int(len(r.labels)) for r in results},
        },
        "timings": log.timings,
    }
    for key in sorted({k for r in results for k in r.extra}):
        vals = {r.name: r.extra[key] for r in results if key in r.extra}
        out.setdefault("extra", {})[key] = {"per_class": vals, "mean": float(np.mean(list(vals.values())))}
    return out, results


# ------------------------------------------------------------------------------------------------- outputs


def check_output_dir(path: str | os.PathLike) -> Path:
    """The absolute output directory, refusing one that cannot be written (a file, a parent that is a file, a
    read-only folder); checked before any work."""
    from dn2_jax.fileio import check_writable

    return check_writable(path, "dir", parents=True, what="output directory")


def write_outputs(out_dir: str | os.PathLike, results: dict, per_class: list[ClassResult]) -> list[Path]:
    """Writes results.json, roc.png and scores.png into out_dir, each atomically (temp file + rename)."""
    out_dir = check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_roc(out_dir / "roc.png", per_class), _plot_hist(out_dir / "scores.png", per_class)]
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, out_dir / "results.json")
    return [out_dir / "results.json", *written]


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _savefig(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _plot_roc(path: Path, per_class: list[ClassResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dn2_jax.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6, 5.5), layout="constrained")
    for r in per_class:
        fpr, tpr, _ = roc_curve(r.scores, r.labels)
        ax.plot(fpr, tpr, lw=1.2, label=f"{r.name} ({100 * r.auc:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="DN2 ROC per normal class (AUC %)")
    ax.legend(fontsize=7, loc="lower right")
    path = _savefig(fig, path)
    plt.close(fig)
    return path


def _plot_hist(path: Path, per_class: list[ClassResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = _savefig(fig, path)
    plt.close(fig)
    return path
