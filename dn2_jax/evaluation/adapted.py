"""`dn2 eval --adapt panda|msc`: the one-class protocol with the backbone adapted to each normal class first.

Per normal class c: the pretrained backbone is fine-tuned on c's bank images only (`dn2_jax.adapt`), the adapted
weights become a weights directory, and DN2 runs with them exactly as with any other weights (the same
detector, feature cache and scores). The test ROC-AUC after each epoch is recorded to show collapse; it never
steers training (no early stopping on test). With a cache directory, adapted weights are kept under
``<cache>/adapted/`` (keyed by class, bank, settings and base weights) and an interrupted adaptation resumes
from its last epoch, so long studies can be split over several runs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from dn2_jax import adapt, models
from dn2_jax.convert import load_variables, restore_variables
from dn2_jax.data import one_size
from dn2_jax.detector import Detector
from dn2_jax.errors import DN2Error
from dn2_jax.evaluation.config import EvalConfig
from dn2_jax.evaluation.features import FeatureExtractor
from dn2_jax.evaluation.report import ClassResult
from dn2_jax.knn import knn_score, l2_normalize
from dn2_jax.metrics import roc_auc
from dn2_jax.sharding import data_mesh


def adapt_config(cfg: EvalConfig) -> adapt.AdaptConfig:
    """The `AdaptConfig` of an eval run's --adapt-* settings (the rest at their defaults)."""
    return adapt.AdaptConfig(method=cfg.adapt, epochs=cfg.adapt_epochs, batch_size=cfg.adapt_batch_size,
                             learning_rate=cfg.adapt_lr, seed=cfg.seed)


def _features(cfg: EvalConfig, raw: np.ndarray) -> np.ndarray:
    return np.asarray(l2_normalize(raw)) if cfg.normalize else raw


def _weights_dir(cfg: EvalConfig, root: Path, name: str, bank: np.ndarray, acfg: adapt.AdaptConfig,
                 base: str) -> Path:
    key = json.dumps({"class": name, "bank": hashlib.sha256(np.asarray(bank).tobytes()).hexdigest(),
                      "adapt": acfg.to_dict(), "base": base, "backbone": cfg.backbone, "input": cfg.input_size,
                      "dataset": cfg.dataset}, sort_keys=True)
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)[:40]
    return root / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def run_adapted(cfg: EvalConfig, train, test, splits: dict, extract: FeatureExtractor, log) -> Iterator[ClassResult]:
    """Adapt, then score, each split of `splits` (class name -> protocols.OneClassSplit); yields ClassResults
    whose `extra` holds the pretrained ROC-AUC ('auc_pretrained') and per epoch 'loss_epoch_E'/'auc_epoch_E'."""
    if cfg.backbone == "pixels":
        raise DN2Error("--adapt needs a network backbone; the pixels baseline has no weights to adapt")
    if not one_size(train.images) or not one_size(test.images):
        raise DN2Error("--adapt needs images of one size (this dataset mixes sizes)")
    acfg = adapt_config(cfg)
    spec = models.get_backbone(cfg.backbone)
    base_vars = load_variables(cfg.backbone, cfg.weights)
    base = models.fingerprint(base_vars)
    preset = spec.preset if cfg.input_size is None else spec.preset.at_size(cfg.input_size)
    pooled = adapt.pooled_features_fn(spec.module(), preset, data_mesh(jax.local_devices()), cfg.batch_size)
    tmp = None
    if cfg.cache_dir is not None:
        root = Path(cfg.cache_dir) / "adapted"
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dn2-adapted-")
        root = Path(tmp.name)
    try:
        for name, split in splits.items():
            bank_images, test_images = train.images[split.bank], test.images[split.test]
            if len(bank_images) < acfg.batch_size:
                raise DN2Error(f"--adapt-batch-size {acfg.batch_size} is larger than the {len(bank_images)} bank "
                               f"images of class '{name}'")
            labels = split.test_anomaly

            def auc_of(bank_f: np.ndarray, test_f: np.ndarray, labels=labels) -> float:
                bank_f, test_f = _features(cfg, bank_f), _features(cfg, test_f)
                return float(roc_auc(knn_score(test_f, bank_f, k=cfg.knn_k), labels))

            def on_epoch(epoch, variables, bank_images=bank_images, test_images=test_images, auc_of=auc_of):
                p, s = variables["params"], variables["batch_stats"]
                return {"auc": auc_of(pooled(p, s, bank_images), pooled(p, s, test_images))}

            before = auc_of(extract(train, split.bank), extract(test, split.test))
            path = _weights_dir(cfg, root, name, split.bank, acfg, base)
            if path.is_dir():
                history = load_variables_history(path)
                log.print(f"  {name}: reusing adapted weights {path}")
            else:
                log.print(f"  {name}: adapting ({acfg.method}, {acfg.epochs} epochs on {len(bank_images)} images)")
                _, history = adapt.adapt_to_weights(bank_images, cfg.backbone, path, acfg, weights=cfg.weights,
                                                    input_size=cfg.input_size, on_epoch=on_epoch)
            adapted = FeatureExtractor(Detector(cfg.detector_config(weights=str(path))), cfg.cache_dir)
            bank_f, test_f = adapted(train, split.bank), adapted(test, split.test)
            det = adapted.detector.fit_features(bank_f)  # the deployed detector, with the adapted weights
            scores = np.asarray(det.score_features(test_f), np.float64)
            extra = {"auc_pretrained": before}
            for r in history:
                extra[f"loss_epoch_{r['epoch']}"] = float(r["loss"])
                if "auc" in r:
                    extra[f"auc_epoch_{r['epoch']}"] = float(r["auc"])
            yield ClassResult(name, float(roc_auc(scores, labels)), scores, labels, len(split.bank), extra)
    finally:
        if tmp is not None:
            tmp.cleanup()


def load_variables_history(path: Path) -> list[dict]:
    """The training history saved with adapted weights at `path`."""
    return list(restore_variables(path)[1].get("history", []))


def histories(results: dict) -> dict[str, list[dict]]:
    """Per-class histories (epoch 0 = pretrained) from a results.json dict of an --adapt run, for plotting."""
    extra = results.get("extra", {})
    out: dict[str, list[dict]] = {}
    for name in results["per_class"]:
        rows = [{"epoch": 0, "auc": extra["auc_pretrained"]["per_class"][name]}] if "auc_pretrained" in extra else []
        epoch = 1
        while f"loss_epoch_{epoch}" in extra and name in extra[f"loss_epoch_{epoch}"]["per_class"]:
            row = {"epoch": epoch, "loss": extra[f"loss_epoch_{epoch}"]["per_class"][name]}
            if f"auc_epoch_{epoch}" in extra:
                row["auc"] = extra[f"auc_epoch_{epoch}"]["per_class"].get(name)
            rows.append(row)
            epoch += 1
        out[name] = rows
    return out
