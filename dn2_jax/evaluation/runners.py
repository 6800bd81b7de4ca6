"""The paper's evaluation protocol end to end: data -> features (cached in stores) -> DN2 scores -> ROC-AUC.

Modes (``EvalConfig.mode``):
  semi          one-class / unimodal: class c is normal, its train images are the bank, every test image is
                scored, other classes are anomalies (MVTec-style folders: train/good vs test/*).
  unsupervised  the bank of class c is contaminated with a share r of other classes; a cleaning rule
                (``EvalConfig.clean``, `dn2_jax.cleaning`) drops the rows with the largest leave-one-out score
                before scoring. Reports the chosen rule's AUC, and in ``extra`` the AUC without cleaning and with
                the paper's rule, the contaminants left by each, and the estimated vs true contamination.
  group         sets of M images (paper 3.3): group DN2 on orderless pooled set features
                (``EvalConfig.group_pool``, `dn2_jax.pooling`, fitted on the normal train images only) vs the
                paper's mean pool and the pointwise baseline (mean of per-image DN2 scores over the set).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dn2_jax import distributed, protocols
from dn2_jax.cleaning import MIN_ESTIMATE_ROWS, resolve_rule
from dn2_jax.data import Dataset, load_dataset, one_size
from dn2_jax.errors import DN2Error
from dn2_jax.evaluation.config import PIXELS, QUICK, EvalConfig, validate_config
from dn2_jax.evaluation.features import FeatureExtractor
from dn2_jax.evaluation.report import ClassResult, results_dict
from dn2_jax.knn import l2_normalize
from dn2_jax.metrics import roc_auc
from dn2_jax.pooling import fit_set_pool


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
              normalize: bool = False, gather: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """Embeds the union of `index_sets` of `ds` once (timed); returns a lookup indices (any shape) -> features
    (raw, or L2-normalised with `normalize`). In a multi-process job each process embeds its share of the union
    and, with `gather`, every process gets all features (without: `index_sets` are this process's own)."""
    pool = np.unique(np.concatenate([np.ravel(s) for s in index_sets]))
    log.print(f"  embedding {len(pool)} {ds.split} images")
    t0 = time.perf_counter()
    if gather and distributed.process_count() > 1:
        feats = distributed.gather_rows(extract(ds, distributed.share(pool)), len(pool))
    else:
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


def _sharded_score(cfg: EvalConfig, bank_share: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """DN2 scores (float64) of raw `queries` (the same on every process) against the bank whose rows this process
    holds `bank_share` of, sharded over the devices of all processes (`dn2_jax.sharding`): what `_score` gives on
    the whole bank in one process."""
    from dn2_jax.sharding import shard_bank, sharded_knn_score

    prepare = (lambda x: np.asarray(l2_normalize(x), np.float32)) if cfg.normalize else (lambda x: x)
    return np.asarray(sharded_knn_score(prepare(queries), shard_bank(prepare(bank_share)), cfg.knn_k), np.float64)


def _run_semi(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    splits = one_class_splits(cfg, train, test, classes)
    for c, split in splits.items():
        _check_k_fits(cfg.knn_k, len(split.bank), f"of class '{c}'")
    if distributed.process_count() > 1 and min(len(s.bank) for s in splits.values()) >= distributed.process_count():
        # Each process embeds its share of every bank; queries are gathered, banks are sharded.
        shares = {c: distributed.share(s.bank) for c, s in splits.items()}
        train_of = _embedder(extract, log, train, list(shares.values()), gather=False)
        test_of = _embedder(extract, log, test, [s.test for s in splits.values()])
        for c, split in splits.items():
            scores = _sharded_score(cfg, train_of(shares[c]), test_of(split.test))
            yield ClassResult(c, _auc(scores, split.test_anomaly), scores, split.test_anomaly, len(split.bank))
        return
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
    rules = {"none": {"clean": "none"}, "paper": cfg.clean_config("paper"), "chosen": cfg.clean_config()}
    for c, b in banks.items():
        n, name = len(b.bank), train.class_names[c]
        _check_k_fits(cfg.knn_k, n, f"of class '{name}'")
        for settings in (rules["paper"], rules["chosen"]):
            _check_cleaning_fits(cfg.k, n, settings, name)
    train_of = _embedder(extract, log, train, [b.bank for b in banks.values()])
    test_of = _embedder(extract, log, test, [t.test for t in tests.values()])
    for c in classes:
        b, t = banks[c], tests[c]
        bank, queries = train_of(b.bank), test_of(t.test)
        dets = {key: _detector(cfg, bank, **settings) for key, settings in rules.items()}
        aucs = {key: _auc(det.score_features(queries), t.test_anomaly) for key, det in dets.items()}
        left = {key: int(b.contaminant[det.bank_ids].sum()) for key, det in dets.items()}
        extra = {"auc_without_cleaning": aucs["none"], "auc_paper_cleaning": aucs["paper"],
                 "contaminants": left["none"], "contaminants_after_paper_cleaning": left["paper"],
                 "contaminants_after_cleaning": left["chosen"], "bank_after_cleaning": dets["chosen"].bank_size,
                 "contamination": float(b.contaminant.mean())}
        extra["k"] = dets["chosen"].k
        if dets["chosen"].contamination is not None:
            extra["contamination_estimated"] = dets["chosen"].contamination
        scores = np.asarray(dets["chosen"].score_features(queries), np.float64)
        yield ClassResult(train.class_names[c], aucs["chosen"], scores, t.test_anomaly, n, extra)


def _check_cleaning_fits(k: int | None, n: int, settings: dict, name: str) -> None:
    """Before any embedding: the cleaning rule `settings` (detector settings) can clean a bank of `n` images
    of class `name` and leave k + 1 (k None: the rule's score k of what it keeps)."""
    if settings["clean"] == "none":
        return
    rule = resolve_rule(settings["clean"], loo_k=settings.get("clean_k"), fraction=settings.get("clean_fraction"),
                        rounds=settings.get("clean_rounds"))
    what = "the paper's" if rule.rule == "paper" else f"the {rule.rule!r}"
    if rule.k_for(n) >= n:
        raise DN2Error(f"{what} cleaning needs a bank larger than its leave-one-out k={rule.k_for(n)}; class '{name}' "
                       f"has {n} images: raise --bank-size" + (" or lower --clean-k" if rule.rule != "paper" else ""))
    if rule.rule == "adaptive" and n < MIN_ESTIMATE_ROWS:
        raise DN2Error(f"the 'adaptive' cleaning estimates the contamination, which needs a bank of at least "
                       f"{MIN_ESTIMATE_ROWS} images; class '{name}' has {n}: raise --bank-size")
    kept = n - int(np.floor(rule.fraction * n))
    _check_k_fits(rule.score_k_for(kept) if k is None else k, kept, f"left of class '{name}' after {what} cleaning")


def _run_group(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    n_classes = len(train.class_names)
    if cfg.group_size > n_classes:
        raise DN2Error(f"group_size={cfg.group_size} exceeds the {n_classes} classes of {cfg.dataset}")
    _check_k_fits(cfg.knn_k, cfg.train_groups, "of normal train sets")
    n_norm = cfg.test_groups // 2
    configs = {}
    for c in classes:
        group_classes = [(c + j) % n_classes for j in range(cfg.group_size)]
        configs[c] = (group_classes, *protocols.train_test_groups(
            train.labels, test.labels, group_classes, cfg.train_groups, n_norm, cfg.test_groups - n_norm,
            seed=cfg.seed + c,
        ))
    uses_prototypes = "hist" in cfg.group_pool.split("+")
    for group_classes, train_sets, _ in configs.values():
        n_images = len(np.unique(train_sets))
        if uses_prototypes and cfg.prototypes > n_images:
            raise DN2Error(f"prototypes={cfg.prototypes} is more than the {n_images} normal train images of the sets "
                           f"of {'+'.join(train.class_names[g] for g in group_classes)} they are fitted on; lower "
                           "--prototypes or raise --train-groups")
    train_of = _embedder(extract, log, train, [s for _, s, _ in configs.values()], cfg.normalize)
    test_of = _embedder(extract, log, test, [g.sets for _, _, g in configs.values()], cfg.normalize)
    for group_classes, train_sets, groups in configs.values():
        train_images, test_images = np.unique(train_sets), np.unique(groups.sets)
        tr, te = train_of(train_images), test_of(test_images)  # (n, D) (normalised) image features
        tr_sets, te_sets = np.searchsorted(train_images, train_sets), np.searchsorted(test_images, groups.sets)
        aucs, scores, ks = {}, None, {}
        for name in dict.fromkeys((cfg.group_pool, "mean")):
            # The pool is fitted on the normal train images (and sets) only; set features are scored as they are.
            pool = fit_set_pool(tr, name, prototypes=cfg.prototypes, seed=cfg.seed, sets=tr_sets)
            ks[name] = pool.score_k(len(tr_sets)) if cfg.k is None else cfg.k
            pooled = _score(cfg, np.asarray(pool(tr, tr_sets)), np.asarray(pool(te, te_sets)), normalize=False,
                            k=ks[name])
            aucs[name] = _auc(pooled, groups.anomaly)
            scores = pooled if scores is None else scores
        # Pointwise baseline: each test image against the individual train images, averaged over the set.
        flat = _score(cfg, tr, te, normalize=False)[te_sets]
        extra = {"auc_mean_pool": aucs["mean"], "auc_pointwise": _auc(flat.mean(1), groups.anomaly),
                 "k": ks[cfg.group_pool]}
        name = "+".join(train.class_names[g] for g in group_classes)
        yield ClassResult(name, aucs[cfg.group_pool], scores, groups.anomaly, len(train_sets), extra)


def _run_adapted(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    from dn2_jax.evaluation.adapted import run_adapted

    splits = one_class_splits(cfg, train, test, classes)
    for c, split in splits.items():
        _check_k_fits(cfg.knn_k, len(split.bank), f"of class '{c}'")
    yield from run_adapted(cfg, train, test, splits, extract, log)


def _run_patch(cfg, train, test, classes, extract, log) -> Iterator[ClassResult]:
    from dn2_jax.evaluation.patch import run_patch

    yield from run_patch(cfg, train, test, one_class_splits(cfg, train, test, classes), extract, log)


RUNNERS = {"semi": _run_semi, "unsupervised": _run_unsupervised, "group": _run_group}


def evaluate(cfg: EvalConfig, printer: Callable[[str], None] | None = print, *,
             extractor: FeatureExtractor | None = None) -> tuple[dict, list[ClassResult]]:
    """Runs the protocol; returns (results dict as written to results.json, per-class results).

    With ``cfg.skip_bad_images`` image files that cannot be decoded are left out; the results list them
    (``skipped_images``: split, path, reason).

    `extractor` (optional) replaces the one built from cfg (e.g. with random weights in tests).
    """
    validate_config(cfg)
    log = _Log(printer)
    t_start = time.perf_counter()
    on_error = "skip" if cfg.skip_bad_images else "raise"
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, on_error=on_error)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir, on_error=on_error)
    log.timing("load_s", time.perf_counter() - t_start)
    classes = select_classes(cfg, train)
    if cfg.backbone == PIXELS and not one_size(train.images):
        raise DN2Error("the raw-pixel baseline needs images of one size; this dataset mixes sizes")
    cfg = quick_sizes(cfg, train, test, classes, log.print)
    t0 = time.perf_counter()
    extract = extractor or FeatureExtractor.from_config(cfg, cache_dir=cfg.cache_dir)
    log.timing("load_s", time.perf_counter() - t0)
    k = cfg.knn_k if cfg.k is not None or cfg.mode == "semi" else {"unsupervised": "the cleaning rule's",
                                                                    "group": "the pool's"}[cfg.mode]
    log.print(f"DN2 {cfg.mode} on {cfg.dataset} with {cfg.backbone}, k={k}")
    # Runners validate, embed (timed as embed_s) and then yield one result per class as it is scored.
    results, t0, embed_before = [], time.perf_counter(), log.timings.get("embed_s", 0.0)
    runner = _run_adapted if cfg.adapt is not None else _run_patch if cfg.level == "patch" else RUNNERS[cfg.mode]
    for res in runner(cfg, train, test, classes, extract, log):
        log.row(res)
        results.append(res)
    log.timing("score_s", time.perf_counter() - t0 - (log.timings.get("embed_s", 0.0) - embed_before))
    log.timing("total_s", time.perf_counter() - t_start)
    settings = dataclasses.asdict(cfg)
    if cfg.mode == "semi":
        settings["k"] = cfg.knn_k  # unsupervised and group: the k each class scored with is in extra.k
    out = results_dict(settings, results, log.timings)
    out["skipped_images"] = [{"split": ds.split, "path": path, "reason": reason}
                             for ds in (train, test) for path, reason in ds.skipped]
    log.print(f"  {'mean':<32} ROC-AUC {100 * out['mean']:6.2f}")
    return out, results
