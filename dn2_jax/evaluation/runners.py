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
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dn2_jax import protocols
from dn2_jax.data import Dataset, load_dataset
from dn2_jax.errors import DN2Error
from dn2_jax.evaluation.config import PIXELS, QUICK, EvalConfig, validate_config
from dn2_jax.evaluation.features import FeatureExtractor
from dn2_jax.evaluation.report import ClassResult, results_dict
from dn2_jax.knn import l2_normalize, pool_groups
from dn2_jax.metrics import roc_auc


class _Log:
    def __init__(self, printer: Callable[[str], None] | None):
        self.print = printer or (lambda s: None)
        self.timings: dict[str, float] = {}

    def timing(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 3)

    def row(self, res: ClassResult) -> None:
        extra = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.extra.items()
                          if "_epoch_" not in k)  # per-epoch adaptation curves: results.json and adaptation.png
        self.print(f"  {res.name:<32} ROC-AUC {100 * res.auc:6.2f}   bank {res.bank:>6}   {extra}")


def _check_k_fits(k: int, bank: int, what: str) -> None:
    if k > bank - 1:  # the detector's leave-one-out calibration needs k other bank images for each one
        raise DN2Error(f"k={k} is larger than the bank allows ({bank} images {what}; a detector needs at least "
                       f"k + 1 = {k + 1}); lower --k or raise --bank-size")


def _embedder(extract: FeatureExtractor, log: _Log, ds: Dataset, index_sets,
              normalize: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Embeds the union of `index_sets` of `ds` once (timed); returns a lookup indices (any shape) -> features
    (raw, or L2-normalised with `normalize`)."""
    pool = np.unique(np.concatenate([np.ravel(s) for s in index_sets]))
    log.print(f"  embedding {len(pool)} {ds.split} images")
    t0 = time.perf_counter()
    feats = extract(ds, pool)
    if normalize:
        feats = np.asarray(l2_normalize(feats))
    log.timing("embed_s", time.perf_counter() - t0)
    return lambda idx: feats[np.searchsorted(pool, idx)]


def _detector(cfg: EvalConfig, features: np.ndarray, **changes):
    """The detector `dn2 fit` deploys with this run's settings (and `changes`), fitted to bank `features`
    (raw: normalised inside when cfg.normalize). Its ids are the rows of `features`."""
    from dn2_jax.detector import Detector

    return Detector(cfg.detector_config(**changes)).fit_features(features)


def _score(cfg: EvalConfig, bank: np.ndarray, queries: np.ndarray, **changes) -> np.ndarray:
    """DN2 scores (float64) of raw `queries` against raw `bank` through the detector."""
    return np.asarray(_detector(cfg, bank, **changes).score_features(queries), np.float64)


def _auc(scores, labels) -> float:
    return float(roc_auc(np.asarray(scores, np.float32), labels))


def select_classes(cfg: EvalConfig, train: Dataset) -> list[int]:
    """The normal classes of `cfg` (all when None), checked against the dataset's."""
    n_classes, class_names = len(train.class_names), train.class_names
    if cfg.classes is None:
        return list(range(n_classes))
    bad = [c for c in cfg.classes if not 0 <= c < n_classes]
    if bad:
        raise DN2Error(
            f"class {bad[0]} does not exist in {cfg.dataset}: it has {n_classes} classes, 0..{n_classes - 1} "
            f"({', '.join(class_names[:4])}, ...)"
        )
    return list(cfg.classes)


def quick_sizes(cfg: EvalConfig, train: Dataset, test: Dataset, classes: Sequence[int],
                printer: Callable[[str], None] | None = print) -> EvalConfig:
    """`cfg` with the quick subsample's bank_size/test_size when cfg.quick and neither is given, capped at what
    the data has (the smallest normal class, the test split); says so through `printer`."""
    if not cfg.quick or cfg.mode == "group" or cfg.dataset.startswith("mvtec:"):
        return cfg
    if cfg.bank_size is not None or cfg.test_size is not None:
        return cfg
    smallest = min(int(np.sum(train.labels == c)) for c in classes)
    sizes = {"bank_size": min(QUICK["bank_size"], smallest), "test_size": min(QUICK["test_size"], len(test))}
    if printer is not None:
        printer(f"quick run on a subsample ({sizes['bank_size']} train images per class, {sizes['test_size']} of "
                f"{len(test)} test images, stratified); add --full for the paper's full protocol.")
    return dataclasses.replace(cfg, **sizes)


def one_class_splits(cfg: EvalConfig, train: Dataset, test: Dataset,
                     classes: Sequence[int]) -> dict[str, protocols.OneClassSplit]:
    """The semi-supervised (one-class) protocol's split per normal class, by class name (MVTec-style folders:
    one split, train/good vs every test image). The same splits for every runner and launcher."""
    if cfg.dataset.startswith("mvtec:"):
        name = cfg.dataset.split(":", 1)[1].rstrip("/").split("/")[-1]
        return {name: protocols.mvtec_split(train.labels, test.labels)}
    kw = dict(bank_size=cfg.bank_size, test_size=cfg.test_size, n_classes=len(train.class_names), seed=cfg.seed)
    return {train.class_names[c]: protocols.one_class(train.labels, test.labels, c, **kw) for c in classes}


def _run_semi(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    splits = one_class_splits(cfg, train, test, classes)
    for c, split in splits.items():
        _check_k_fits(cfg.k, len(split.bank), f"of class '{c}'")
    train_of = _embedder(extract, log, train, [s.bank for s in splits.values()])
    test_of = _embedder(extract, log, test, [s.test for s in splits.values()])
    for c, split in splits.items():
        scores = _score(cfg, train_of(split.bank), test_of(split.test))
        yield ClassResult(c, _auc(scores, split.test_anomaly), scores, split.test_anomaly, len(split.bank))


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
        raw = _score(cfg, bank, queries)
        extra = {"auc_without_cleaning": _auc(raw, t.test_anomaly), "contaminants": int(b.contaminant.sum())}
        scores = raw
        if cfg.clean_fraction > 0:
            det = _detector(cfg, bank, clean="paper", clean_fraction=cfg.clean_fraction)
            extra["contaminants_after_cleaning"] = int(b.contaminant[det.bank_ids].sum())
            scores = np.asarray(det.score_features(queries), np.float64)
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
    train_of = _embedder(extract, log, train, [s for _, s, _ in configs.values()], cfg.normalize)
    test_of = _embedder(extract, log, test, [g.sets for _, _, g in configs.values()], cfg.normalize)
    for group_classes, train_sets, groups in configs.values():
        tr, te = train_of(train_sets), test_of(groups.sets)  # (G, M, D)
        # Set features: the mean of the (normalised) image features; scored as they are.
        scores = _score(cfg, np.asarray(pool_groups(tr)), np.asarray(pool_groups(te)), normalize=False)
        # Pointwise baseline: each test image against the individual train images, averaged over the set.
        flat = _score(cfg, train_of(np.unique(train_sets)), te.reshape(-1, te.shape[-1]), normalize=False)
        flat = flat.reshape(te.shape[:2])
        extra = {"auc_pointwise": _auc(flat.mean(1), groups.anomaly)}
        name = "+".join(train.class_names[g] for g in group_classes)
        yield ClassResult(name, _auc(scores, groups.anomaly), scores, groups.anomaly, len(train_sets), extra)


def _run_adapted(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    from dn2_jax.evaluation.adapted import run_adapted

    splits = one_class_splits(cfg, train, test, classes)
    for c, split in splits.items():
        _check_k_fits(cfg.k, len(split.bank), f"of class '{c}'")
    yield from run_adapted(cfg, train, test, splits, extract, log)


RUNNERS = {"semi": _run_semi, "unsupervised": _run_unsupervised, "group": _run_group}


def evaluate(cfg: EvalConfig, printer: Callable[[str], None] | None = print, *,
             extractor: FeatureExtractor | None = None) -> tuple[dict, list[ClassResult]]:
    """Runs the protocol; returns (results dict as written to results.json, per-class results).

    `extractor` (optional) replaces the one built from cfg (e.g. with random weights in tests).
    """
    validate_config(cfg)
    log = _Log(printer)
    t_start = time.perf_counter()
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    log.timing("load_s", time.perf_counter() - t_start)
    classes = select_classes(cfg, train)
    if cfg.backbone == PIXELS and not isinstance(train.images, np.ndarray):
        raise DN2Error("the raw-pixel baseline needs images of one size; this dataset mixes sizes")
    cfg = quick_sizes(cfg, train, test, classes, log.print)
    t0 = time.perf_counter()
    extract = extractor or FeatureExtractor.from_config(cfg, cache_dir=cfg.cache_dir)
    log.timing("load_s", time.perf_counter() - t0)
    log.print(f"DN2 {cfg.mode} on {cfg.dataset} with {cfg.backbone}, k={cfg.k}")
    # Runners validate, embed (timed as embed_s) and then yield one result per class as it is scored.
    results, t0, embed_before = [], time.perf_counter(), log.timings.get("embed_s", 0.0)
    runner = _run_adapted if cfg.adapt is not None else RUNNERS[cfg.mode]
    for res in runner(cfg, train, test, classes, extract, log):
        log.row(res)
        results.append(res)
    log.timing("score_s", time.perf_counter() - t0 - (log.timings.get("embed_s", 0.0) - embed_before))
    log.timing("total_s", time.perf_counter() - t_start)
    out = results_dict(dataclasses.asdict(cfg), results, log.timings)
    log.print(f"  {'mean':<32} ROC-AUC {100 * out['mean']:6.2f}")
    return out, results
