"""The DN2 detector object: settings + a bank of normal features + leave-one-out calibration.

    det = Detector(backbone="efficientnet_lite0", k=2)      # or Detector(DetectorConfig(...))
    det.fit(train_images)                                   # uint8 (N, H, W[, C]), a list, a Dataset or a store
    det.score(test_images)                                  # (M,) float32, squared feature units, higher = worse
    det.predict(test_images)                                # (M,) bool: score > threshold (target FPR)
    det.p_values(test_images)                               # (M,) conformal p-values in (0, 1]
    det.neighbours(test_images)                             # (M, k) ids or paths and squared distances
    det.save("my.dn2"); Detector.load("my.dn2")             # one directory, published atomically

Features are computed exactly as `dn2 eval` computes them: one jitted, data-parallel embedding function
(`dn2_jax.embedding.make_embed_fn`) built once per detector and reused for every call (images of mixed sizes
are grouped by shape: one compilation per shape), then `knn.l2_normalize` when `normalize` is on. Scores are
`knn.knn_score`; the calibration scores are `knn.self_knn_score` of the bank (leave-one-out); the threshold is
`knn.fpr_quantile` of them, i.e. `knn.threshold`.

A saved detector is a directory::

  detector.json    format, config, feature identity (backbone, weights fingerprint, preset), paths, threshold
  bank/            embedding store (dn2_jax.store): every fitted feature (after normalisation), ids
  calibration/     embedding store: (n, 1) leave-one-out scores of the kept bank rows; ids = their bank rows
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax import cleaning, knn, pipeline
from dn2_jax.data import Dataset
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.patch import REDUCTIONS
from dn2_jax.preprocessing import check_images

PIXELS = "pixels"  # raw-pixel baseline: the image itself, flattened, in [0, 1], through the same kNN path.
DTYPES = ("float32", "bfloat16")
FORMAT = "dn2-detector"
FORMAT_VERSION = 2  # 2: clean_rounds, rule defaults for clean_k/clean_fraction, the contamination estimate
_READABLE_VERSIONS = (1, 2)
MANIFEST = "detector.json"
LEVELS = ("image", "patch")


def _field(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _clean_rules_help() -> str:
    """The rules of `dn2_jax.cleaning` with their defaults, for help texts."""
    rules = []
    for rule in cleaning.CLEAN_RULES:
        if rule == "none":
            rules.append("none")
            continue
        s = cleaning.resolve_rule(rule)
        rules.append(f"{rule} ({s.describe()}{', at most: drops the estimated contamination' * (rule == 'adaptive')})")
    return "; ".join(rules) + f"; {cleaning.DEFAULT_CLEAN!r} was chosen on a validation split"


def _backbone_names() -> tuple[str, ...]:
    from dn2_jax.models import BACKBONES

    return (*BACKBONES, PIXELS)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Settings of a detector (plain data; saved with it). Every field carries `metadata["help"]` (and
    `metadata["choices"]` where the values are a fixed set), so a command line can be derived from it."""

    backbone: str = _field("efficientnet_lite0", "feature extractor: a registered backbone, or 'pixels' for the "
                           "raw-pixel baseline")
    weights: str | None = _field(None, "backbone weights: an Orbax directory or a torch checkpoint "
                                 "(default: the backbone's bundled ImageNet weights)")
    input_size: int | None = _field(None, "input (crop) size in pixels fed to the backbone (default: its preset)")
    dtype: str = _field("float32", "backbone compute dtype (features are float32 either way)", choices=DTYPES)
    normalize: bool = _field(True, "L2-normalise features before kNN (the measured default; off = raw features)")
    k: int | None = _field(None, "nearest bank images averaged in the score (default: 2, the paper's; after "
                           "cleaning with a rule that scores with a share of the kept bank ('fixed'), that share: "
                           "see clean)")
    clean: str = _field("none", f"cleaning of a contaminated bank before calibration: {_clean_rules_help()}",
                        choices=cleaning.CLEAN_RULES)
    clean_fraction: float | None = _field(None, "share of the bank cleaning drops in all (adaptive: at most), in "
                                          "(0, 1) (default: the rule's)")
    clean_k: int | None = _field(None, "leave-one-out neighbours of the cleaning score, independent of k, smaller "
                                 "than the bank (default: the rule's: paper 2, fixed/adaptive 10%% of the bank)")
    clean_rounds: int | None = _field(None, "rounds of cleaning, each re-scoring the rows kept so far (default: "
                                      "the rule's)")
    fpr: float = _field(0.05, "target false-positive rate of predict(), in (0, 1)")
    batch_size: int = _field(64, "images per backbone step")
    level: str = _field("image", "image: one DN2 score per image; patch: patch-level kNN (SPADE / PatchCore) "
                        "with an anomaly map per image (`dn2 score --maps`)", choices=LEVELS)
    layers: tuple[str, ...] | None = _field(None, "level patch: backbone feature maps whose patches are compared, "
                                            "e.g. stage3,stage5 (default: the backbone's, e.g. stage3,stage5 for "
                                            "EfficientNet-Lite)")
    pool: int | None = _field(None, "level patch: each patch feature is averaged over its pool x pool "
                              "neighbourhood, odd (default: 3)")
    proj_dim: int | None = _field(None, "level patch: random projection of the patch features to this many dims "
                                  "(default: none)")
    coreset: float | None = _field(None, "level patch: fraction of the training patches the greedy k-center "
                                   "coreset keeps in the bank, in (0, 1] (default: 0.1; 1 = all)")
    reduce: str | None = _field(None, "level patch: image score from its patch scores: max, topk_mean (mean of "
                                "the 10 largest) or patchcore (re-weighted max) (default: max)",
                                choices=REDUCTIONS)
    sigma: float | None = _field(None, "level patch: Gaussian smoothing of the anomaly maps, in input pixels, 0 "
                                 "= none (default: 4)")

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        if not isinstance(self.backbone, str) or self.backbone not in _backbone_names():
            raise DN2Error(f"backbone: unknown backbone {self.backbone!r}; known: {', '.join(_backbone_names())}")
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise DN2Error(f"weights must be None or a path, got {type(self.weights).__name__}")
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))
            if self.backbone == PIXELS:
                raise DN2Error("weights: the 'pixels' backbone has no weights; leave weights unset")
        if self.input_size is not None:
            if not is_int(self.input_size) or self.input_size < 1:
                raise DN2Error(f"input_size must be None or a positive int, got {self.input_size!r}")
            if self.backbone == PIXELS:
                raise DN2Error("input_size: the 'pixels' backbone uses images as they are; leave input_size unset")
        if self.dtype not in DTYPES:
            raise DN2Error(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.normalize, (bool, np.bool_)):
            raise DN2Error(f"normalize must be True or False, got {self.normalize!r}")
        for name in ("k", "batch_size"):
            value = getattr(self, name)
            if (value is not None or name != "k") and (not is_int(value) or value < 1):
                raise DN2Error(f"{name} must be a positive int, got {value!r}")
        if self.clean not in cleaning.CLEAN_RULES:
            raise DN2Error(f"clean must be one of {', '.join(cleaning.CLEAN_RULES)}, got {self.clean!r}")
        for name in ("clean_k", "clean_rounds"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise DN2Error(f"{name} must be None or a positive int, got {value!r}")
        for name in ("clean_fraction", "fpr"):
            value = getattr(self, name)
            if value is None and name == "clean_fraction":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not 0.0 < float(value) < 1.0:
                raise DN2Error(f"{name} must be a number in (0, 1), got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.clean == "none" and (given := [n for n in CLEAN_OPTIONS if getattr(self, n) is not None]):
            raise DN2Error(f"{', '.join(given)} only apply with a cleaning rule (clean is 'none'); choose one of "
                           f"{', '.join(r for r in cleaning.CLEAN_RULES if r != 'none')}")
        for name in ("k", "batch_size", "input_size", "clean_k", "clean_rounds"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "normalize", bool(self.normalize))
        self._check_level()

    def _check_level(self) -> None:
        if self.level not in LEVELS:
            raise DN2Error(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        given = [n for n in PATCH_OPTIONS if getattr(self, n) is not None]
        if self.level == "image":
            if given:
                raise DN2Error(f"{', '.join(given)} only apply with level='patch' (--level patch)")
            return
        if self.backbone == PIXELS:
            raise DN2Error("level 'patch' needs a network backbone (patch features of its layers); the 'pixels' "
                           "baseline has none")
        if self.clean != "none":
            raise DN2Error(f"clean={self.clean!r}: cleaning applies to level 'image' only; a patch-level bank is "
                           "fitted to normal images")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, str) else self.layers
            if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(x, str) and x
                                                                             for x in layers):
                raise DN2Error(f"layers must be a non-empty list of feature map names, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(layers))
        for name in ("coreset", "sigma"):
            if getattr(self, name) is not None:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                    raise DN2Error(f"{name} must be a number, got {value!r}")
                object.__setattr__(self, name, float(value))
        for name in ("pool", "proj_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
                raise DN2Error(f"{name} must be None or an int, got {value!r}")
        self.patch_config()  # ranges: pool odd, coreset in (0, 1], proj_dim and sigma, reduce

    def patch_config(self):
        """The `dn2_jax.patch.PatchConfig` of a level-'patch' config (None fields at the library defaults; `k`
        nearest bank patches; `input_size`)."""
        from dn2_jax.patch import PatchConfig

        kw = {n: getattr(self, n) for n in PATCH_OPTIONS if getattr(self, n) is not None}
        return PatchConfig(**kw, k=self.score_k(), input_size=self.input_size)

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with `changes` (validated); unknown names raise DN2Error listing the fields."""
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return dataclasses.asdict(self)

    def score_k(self, n_kept: int | None = None) -> int:
        """The k of the DN2 score over a bank of n_kept rows: `k`, else the cleaning rule's
        (`cleaning.CleanSettings.score_k_for`: a share of the kept rows for 'fixed', else the paper's 2)."""
        if self.k is not None:
            return self.k
        settings = self.clean_settings()
        if settings.score_share is None or self.level == "patch":
            return cleaning.PAPER_K
        if n_kept is None:
            raise DN2Error(f"the k of cleaning rule {self.clean!r} depends on the bank size: pass n_kept")
        return settings.score_k_for(n_kept)

    def clean_settings(self) -> cleaning.CleanSettings:
        """The cleaning rule with its options resolved (None = the rule's default)."""
        return cleaning.resolve_rule(self.clean, loo_k=self.clean_k, fraction=self.clean_fraction,
                                     rounds=self.clean_rounds)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """The config of `to_dict` output (validated); unknown keys raise DN2Error."""
        if not isinstance(data, dict):
            raise DN2Error(f"a detector config must be a dict, got {type(data).__name__}")
        _check_field_names(data)
        return cls(**data)


CLEAN_OPTIONS = ("clean_k", "clean_fraction", "clean_rounds")
PATCH_OPTIONS = ("layers", "pool", "proj_dim", "coreset", "reduce", "sigma")


def _check_field_names(names: Any) -> None:
    known = [f.name for f in dataclasses.fields(DetectorConfig)]
    if unknown := [n for n in names if n not in known]:
        raise DN2Error(f"unknown detector setting(s) {', '.join(map(repr, unknown))}; settings: {', '.join(known)}")


@dataclasses.dataclass(frozen=True)
class Query:
    """Everything a detector says about M queries (see `Detector.query`).

    scores: (M,) float32 DN2 scores, squared feature units, higher = more anomalous.
    p_values: (M,) float64 conformal p-values in (0, 1]; small = anomalous.
    anomalous: (M,) bool, scores > threshold.
    neighbours: (M, k) ids (int64) or paths (str) of the nearest bank images, nearest first.
    neighbour_sq_dists: (M, k) float32 squared distances to them.
    """

    scores: np.ndarray
    p_values: np.ndarray
    anomalous: np.ndarray
    neighbours: np.ndarray
    neighbour_sq_dists: np.ndarray


class _Features:
    """The feature pipeline of a config: identity (what a store must match) and uint8 images -> raw features."""

    def __init__(self, cfg: DetectorConfig):
        if cfg.backbone == PIXELS:
            self.identity = {"backbone": PIXELS, "fingerprint": "none", "preset": "pixels/255"}
            self.embed_fn: Callable[[np.ndarray], np.ndarray] = _pixels
            self.feature_dim: int | None = None
            return
        import jax.numpy as jnp

        from dn2_jax.convert import load_variables
        from dn2_jax.embedding import make_embed_fn
        from dn2_jax.models import fingerprint, get_backbone

        spec = get_backbone(cfg.backbone)
        variables = load_variables(cfg.backbone, cfg.weights)
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        fn = make_embed_fn(spec, variables, batch_size=cfg.batch_size, dtype=dtype, input_size=cfg.input_size)
        self.identity = {
            "backbone": cfg.backbone,
            "fingerprint": fingerprint(variables),
            "preset": json.dumps(dataclasses.asdict(fn.preset), sort_keys=True),
        }
        self.embed_fn = fn
        self.feature_dim = fn.feature_dim


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _is_store(x: Any) -> bool:
    from dn2_jax.store import EmbeddingStore

    return isinstance(x, (EmbeddingStore, str, os.PathLike))


class Detector:
    """DN2 anomaly detector: a bank of normal features, scored by mean squared distance to the k nearest.

    `Detector(config=None, **overrides)`: `config` a `DetectorConfig` (default settings if None), `overrides`
    any of its fields (e.g. `Detector(backbone="resnet18", weights="r18.pth", k=5)`). The backbone is loaded
    on first use. Inputs called `images` below are uint8 (N, H, W) / (N, H, W, C), a list of N such (H, W[, C])
    arrays of possibly different sizes, or a `dn2_jax.data.Dataset`; `fit`, `add` and the scoring methods also
    take an embedding store (`EmbeddingStore` or its path) whose backbone, weights fingerprint and preset
    match this detector's. Scores are float32 in squared feature units (of L2-normalised features when
    `normalize`), higher = more anomalous.
    """

    def __new__(cls, config: DetectorConfig | None = None, **overrides: Any):
        """A level-'patch' config makes a `dn2_jax.patch_detector.PatchDetector` (a Detector subclass)."""
        if cls is Detector and overrides.get("level", getattr(config, "level", "image")) == "patch":
            from dn2_jax.patch_detector import PatchDetector

            return super().__new__(PatchDetector)
        return super().__new__(cls)

    def __init__(self, config: DetectorConfig | None = None, **overrides: Any):
        if config is None:
            config = DetectorConfig()
        elif not isinstance(config, DetectorConfig):
            raise DN2Error(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config
        self._pipeline: _Features | None = None
        self._features: np.ndarray | None = None  # every fitted feature (N, D), incl. rows dropped by cleaning
        self._ids: np.ndarray | None = None  # (N,) int64
        self._paths: list[str] | None = None  # N paths, or None
        self._kept: np.ndarray | None = None  # (n,) int64 rows of _features in the bank (after cleaning)
        self._calibration: np.ndarray | None = None  # (n,) float32 leave-one-out scores of the bank
        self._sorted_calibration: np.ndarray | None = None
        self._bank_device: Any = None  # (bank, squared norms) on device, reused by every query
        self._contamination: float | None = None  # estimated share of contaminants in the fitted images

    def __repr__(self) -> str:
        state = f"bank={self.bank_size}" if self.is_fitted else "not fitted"
        return f"Detector({self.config}, {state})"

    # ------------------------------------------------------------------------------------------ properties

    @property
    def is_fitted(self) -> bool:
        return self._kept is not None

    @property
    def identity(self) -> dict[str, str]:
        """{"backbone", "fingerprint", "preset"}: what an embedding store must match (loads the backbone)."""
        return dict(self._pipe().identity)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the backbone weights the config resolves to ("none" for pixels)."""
        return self._pipe().identity["fingerprint"]

    @property
    def embed_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """The jitted batch function uint8 (B, H, W[, C]) -> raw (B, D) float32 features (no normalisation),
        e.g. for `store.extract_to_store`; the detector reuses the same one."""
        return self._pipe().embed_fn

    @property
    def bank_size(self) -> int:
        """Images in the bank (after cleaning)."""
        return len(self._fitted()[1])

    @property
    def bank(self) -> np.ndarray:
        """(n, D) float32 bank features (normalised if configured), the rows kept by cleaning."""
        features, kept = self._fitted()
        return features[kept]

    @property
    def bank_ids(self) -> np.ndarray:
        """(n,) int64 ids of the bank rows."""
        return self._ids[self._fitted()[1]]

    @property
    def bank_paths(self) -> list[str] | None:
        """Paths of the bank rows, or None if the detector was fitted without paths."""
        kept = self._fitted()[1]
        return None if self._paths is None else [self._paths[i] for i in kept]

    @property
    def contamination(self) -> float | None:
        """Estimated share in [0, 1) of contaminants (anomalies) among every fitted image, from the cleaning
        rule's leave-one-out scores (`dn2_jax.cleaning.estimate_contamination`); None when the detector does
        not clean (clean='none') or the bank is too small for an estimate. Saved with the detector."""
        self._fitted()
        return self._contamination

    @property
    def calibration_scores(self) -> np.ndarray:
        """(n,) float32 leave-one-out DN2 scores of the bank (each row against the other n - 1)."""
        self._fitted()
        return self._calibration.copy()

    @property
    def threshold(self) -> float:
        """Decision threshold of `predict`: the (1 - fpr) quantile of `calibration_scores` (`knn.threshold`)."""
        self._fitted()
        return float(knn.fpr_quantile(self._calibration, self.config.fpr))

    # ------------------------------------------------------------------------------------------ features

    def embed(self, images: Any, *, raw: bool = False) -> np.ndarray:
        """(N, D) float32 features of `images` as the kNN sees them (L2-normalised if configured); `raw=True`
        returns the backbone's features before normalisation (what embedding stores hold)."""
        if _is_store(images):
            raise DN2Error("images must be images, not a store (its features are already embedded)")
        features = self._embed_raw(images.images if isinstance(images, Dataset) else images)
        return features if raw else self._prepare(features, "features")

    def _pipe(self) -> _Features:
        if self._pipeline is None:
            self._pipeline = _Features(self.config)
        return self._pipeline

    def _embed_raw(self, images: Any) -> np.ndarray:
        """Raw features of uint8 images (array or list of mixed sizes), in input order; validated first."""
        if pipeline.is_lazy(images) and not _is_store(images):
            return self._embed_stream(images)
        if isinstance(images, np.ndarray):
            check_images(images)
            if len(images) == 0:
                raise DN2Error("images is empty: nothing to embed")
            groups = [np.arange(len(images))]
        else:
            if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
                raise DN2Error(f"images must be a uint8 array, a list of uint8 arrays or a Dataset, "
                               f"got {type(images).__name__}")
            if len(images) == 0:
                raise DN2Error("images is empty: nothing to embed")
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, image in enumerate(images):
                if not isinstance(image, np.ndarray):
                    raise DN2Error(f"images[{i}] must be a numpy array, got {type(image).__name__}")
                check_images(image[None], what=f"images[{i}]")
                by_shape.setdefault(image.shape, []).append(i)
            groups = [np.asarray(idx) for idx in by_shape.values()]
            if self.config.backbone == PIXELS and len(groups) > 1:
                raise DN2Error("the 'pixels' backbone needs images of one size; these mix "
                               f"{len(groups)} sizes")
        fn = self._pipe().embed_fn
        if isinstance(images, np.ndarray):
            return np.asarray(fn(images), np.float32)
        out = None
        for idx in groups:
            feats = np.asarray(fn(np.stack([images[i] for i in idx])), np.float32)
            if out is None:
                out = np.empty((len(images), feats.shape[1]), np.float32)
            out[idx] = feats
        return out

    def _embed_stream(self, images: Any) -> np.ndarray:
        """Raw features of a lazy source (e.g. `data.FolderImages`), streamed by `pipeline.batches` in shape
        order: decoded a few batches ahead in reader threads, never all in memory."""
        if len(images) == 0:
            raise DN2Error("images is empty: nothing to embed")
        order = pipeline.order_by_shape(images, np.arange(len(images)))
        if self.config.backbone == PIXELS and len(set(pipeline.image_shapes(images, order[[0, -1]]))) > 1:
            raise DN2Error("the 'pixels' backbone needs images of one size; these mix sizes")
        fn, out = self._pipe().embed_fn, None
        for positions, batch in pipeline.batches(images, order, self.config.batch_size):
            check_images(batch, what=f"images[{int(order[positions[0]])}]")
            feats = np.asarray(fn(batch), np.float32)
            if out is None:
                out = np.empty((len(images), feats.shape[1]), np.float32)
            out[order[positions]] = feats
        return out

    def _prepare(self, raw: np.ndarray, what: str) -> np.ndarray:
        """Checks (N, D) raw features (finite, D as the backbone's / the bank's) and normalises if configured."""
        feats = np.asarray(raw)
        if feats.ndim != 2 or not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype,
                                                                                            np.integer)):
            raise DN2Error(f"{what} must be a (N, D) float array, got shape {feats.shape} {feats.dtype}")
        if feats.shape[0] == 0:
            raise DN2Error(f"{what} is empty: got shape {feats.shape}")
        feats = np.asarray(feats, np.float32)
        dim = None
        if self._features is not None:
            dim, source = self._features.shape[1], "the bank"
        elif self._pipeline is not None and self._pipeline.feature_dim is not None:
            dim, source = self._pipeline.feature_dim, f"backbone {self.config.backbone}"
        elif self.config.backbone != PIXELS:
            from dn2_jax.models import get_backbone

            dim, source = get_backbone(self.config.backbone).feature_dim, f"backbone {self.config.backbone}"
        if dim is not None and feats.shape[1] != dim:
            raise DN2Error(f"{what} have dim {feats.shape[1]}, {source} has dim {dim}")
        if not np.all(np.isfinite(feats)) or float(np.max(np.abs(feats))) ** 2 * feats.shape[1] > 1e37:
            raise DN2Error(f"{what} hold non-finite values or values too large for float32 distances")
        if self.config.normalize:
            feats = np.asarray(knn.l2_normalize(feats), np.float32)
        return feats

    def _inputs(self, x: Any, paths: Any, ids: Any, *, what: str
                ) -> tuple[np.ndarray, list[str] | None, np.ndarray | None]:
        """(features prepared for kNN, paths or None, ids or None) of images / a Dataset / a store."""
        if isinstance(x, Dataset):
            if paths is None and x.paths is not None:
                paths = list(x.paths)
            raw = self._embed_raw(x.images)
        elif _is_store(x):
            raw, store_ids = self._open_store(x)
            if ids is None:
                ids = store_ids
        elif isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
            raise DN2Error(f"{what} is a (N, D) float array: for features use fit_features / score_features / "
                           "add_features; images must be uint8 (N, H, W[, C])")
        else:
            raw = self._embed_raw(x)
        return self._prepare(raw, what), paths, ids

    def _open_store(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        from dn2_jax import store

        identity = self._pipe().identity
        st = x if isinstance(x, store.EmbeddingStore) else store.open_store(Path(x).absolute())
        meta = st.metadata
        diffs = [f"{key}: store has {str(meta.get(key))[:60]!r}, detector {str(value)[:60]!r}"
                 for key, value in identity.items() if meta.get(key) != value]
        if "compute_dtype" in meta and meta["compute_dtype"] != self.config.dtype:
            diffs.append(f"compute dtype: store has {meta['compute_dtype']!r}, detector {self.config.dtype!r}")
        if diffs:
            raise DN2Error(f"embedding store '{st.path}' was not made with this detector's features: "
                           f"{'; '.join(diffs)}")
        return st.embeddings(), st.ids

    # ------------------------------------------------------------------------------------------ fitting

    def fit(self, x: Any, *, paths: Sequence[str] | None = None, ids: Any = None) -> Detector:
        """Fits the bank to normal images `x` (uint8 array, list of arrays, Dataset, or an embedding store /
        its path) and calibrates it. `paths` (N str; default: a Dataset's paths) and `ids` (N ints; default: a
        store's ids, else 0..N-1) name the bank images in `neighbours`. Returns self."""
        feats, paths, ids = self._inputs(x, paths, ids, what="x")
        self._set_bank(feats, paths, ids)
        return self

    def fit_features(self, features: Any, *, paths: Sequence[str] | None = None, ids: Any = None) -> Detector:
        """Fits the bank to precomputed (N, D) raw features (as `embed(raw=True)` returns; normalised here if
        configured). Returns self."""
        self._set_bank(self._prepare(features, "features"), paths, ids)
        return self

    def add(self, x: Any, *, paths: Sequence[str] | None = None, ids: Any = None) -> Detector:
        """Grows the bank with more normal images (any input of `fit`), or (N, D) float features; cleaning
        (if configured) and calibration are redone on the union, so `add` equals `fit` on the union. Default
        ids continue after the existing ones. Returns self."""
        self._fitted()
        if isinstance(x, np.ndarray) and x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
            feats = self._prepare(x, "features")
        else:
            feats, paths, ids = self._inputs(x, paths, ids, what="x")
        return self._grow(feats, paths, ids)

    def add_features(self, features: Any, *, paths: Sequence[str] | None = None, ids: Any = None) -> Detector:
        """`add` for precomputed (N, D) raw features. Returns self."""
        self._fitted()
        return self._grow(self._prepare(features, "features"), paths, ids)

    def _grow(self, feats: np.ndarray, paths: Any, ids: Any) -> Detector:
        n_old, n_new = len(self._features), len(feats)
        if (self._paths is None) != (paths is None):
            have = "has paths" if self._paths is not None else "has no paths"
            raise DN2Error(f"paths: the bank {have}; pass paths for the added images only if the bank has them")
        ids = np.arange(n_old, n_old + n_new) if ids is None else ids
        all_ids = np.concatenate([self._ids, _check_ids(ids, n_new)])
        all_paths = None if paths is None else self._paths + _check_paths(paths, n_new)
        self._set_bank(np.concatenate([self._features, feats]), all_paths, all_ids)
        return self

    def _clean(self, features: np.ndarray) -> tuple[np.ndarray, float | None]:
        """(rows of `features` kept by the configured rule (`cleaning.clean_bank`), sorted ascending int64;
        the estimated contamination of `features` or None). The estimate is the rule's own (adaptive), else
        `cleaning.estimate_contamination` of the first round's leave-one-out scores (None for rule 'none' or a
        bank under `cleaning.MIN_ESTIMATE_ROWS` rows)."""
        settings = self.config.clean_settings()
        if settings.rule == "none":
            return np.arange(len(features), dtype=np.int64), None
        if (loo_k := settings.k_for(len(features))) > len(features) - 1:
            raise DN2Error(f"clean_k={loo_k} (leave-one-out neighbours of {settings.rule!r} cleaning) must "
                           f"be smaller than the bank, which has {len(features)} images")
        first: list[np.ndarray] = []

        def self_score(rows: Any, k: int) -> np.ndarray:  # records the first round's scores (the whole bank)
            scores = np.asarray(knn.self_knn_score(rows, k), np.float32)
            if not first:
                first.append(scores)
            return scores

        res = cleaning.clean_bank(features, settings.rule, loo_k=settings.loo_k, fraction=settings.fraction,
                                  rounds=settings.rounds, self_score=self_score)
        estimate = res.contamination
        if estimate is None and len(first[0]) >= cleaning.MIN_ESTIMATE_ROWS:
            estimate = cleaning.estimate_contamination(first[0])
        return np.asarray(res.keep, np.int64), estimate

    def _set_bank(self, features: np.ndarray, paths: Any, ids: Any) -> None:
        """Validates everything, then cleans, calibrates and replaces the state (all or nothing)."""
        n = len(features)
        ids = np.arange(n, dtype=np.int64) if ids is None else _check_ids(ids, n)
        paths = None if paths is None else _check_paths(paths, n)
        k = self.config.score_k(n)
        if self.config.clean == "none" and k > n - 1:
            raise DN2Error(f"k={k} needs a bank of at least {k + 1} images (k neighbours for the leave-one-out "
                           f"calibration), got {n}")
        kept, contamination = self._clean(features)
        k = self.config.score_k(len(kept))
        if k > len(kept) - 1:
            raise DN2Error(f"k={k} needs at least {k + 1} bank images after cleaning, but cleaning kept "
                           f"{len(kept)} of {n}; lower k or clean_fraction, or fit more images")
        self._install(features, ids, paths, kept, None)
        self._contamination = contamination

    @property
    def k(self) -> int:
        """Nearest bank images averaged in the score: `config.k`, or when that is None the cleaning rule's
        (`DetectorConfig.score_k`: a share of the kept bank for 'fixed', else the paper's 2)."""
        if self.config.k is not None or self.config.clean_settings().score_share is None:
            return self.config.score_k()
        return self.config.score_k(len(self._fitted()[1]))

    def _install(self, features: np.ndarray, ids: np.ndarray, paths: list[str] | None, kept: np.ndarray,
                 calibration: np.ndarray | None) -> None:
        import jax.numpy as jnp

        bank = jnp.asarray(features[kept])
        norms = knn.squared_norms(bank)
        if calibration is None:
            k = self.config.score_k(len(kept))
            calibration = np.asarray(knn.self_knn_score(bank, k, bank_sq_norms=norms), np.float32)
        self._features, self._ids, self._paths, self._kept = features, ids, paths, np.asarray(kept, np.int64)
        self._calibration = np.asarray(calibration, np.float32)
        self._sorted_calibration = np.sort(self._calibration)
        self._bank_device = (bank, norms)

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._kept is None:
            raise DN2Error("this detector is not fitted: call fit(images) or fit_features(features) first "
                           "(or Detector.load a saved one)")
        return self._features, self._kept

    # ------------------------------------------------------------------------------------------ scoring

    def _check_k(self, k: Any) -> int:
        n = len(self._fitted()[1])
        if k is None:
            return self.k
        if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)) or not 1 <= k <= n:
            raise DN2Error(f"k must be an int in [1, {n}] (the bank size), got {k!r}")
        return int(k)

    def _knn(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        bank, norms = self._bank_device
        d, i = knn.knn(feats, bank, k, bank_sq_norms=norms)
        return np.asarray(d, np.float32), np.asarray(i, np.int64)

    def _query_features(self, x: Any, what: str) -> np.ndarray:
        self._fitted()
        return self._inputs(x, None, None, what=what)[0]

    def score_features(self, features: Any) -> np.ndarray:
        """(M,) float32 DN2 scores of (M, D) raw features (normalised here if configured)."""
        self._fitted()
        return self._scores(self._prepare(features, "features"))

    def _scores(self, feats: np.ndarray) -> np.ndarray:
        return self._knn(feats, self.k)[0].mean(axis=1, dtype=np.float32)

    def score(self, images: Any) -> np.ndarray:
        """(M,) float32 DN2 scores (mean squared distance to the k nearest bank features), higher = more
        anomalous."""
        return self._scores(self._query_features(images, "images"))

    def decision_function(self, images: Any) -> np.ndarray:
        """Alias of `score` (the PyOD / scikit-learn name)."""
        return self.score(images)

    def predict(self, images: Any) -> np.ndarray:
        """(M,) bool: score > `threshold` (anomalous at target false-positive rate `fpr`)."""
        return self.score(images) > np.float32(self.threshold)

    def _p_values(self, scores: np.ndarray) -> np.ndarray:
        cal = self._sorted_calibration
        at_least = len(cal) - np.searchsorted(cal, scores, side="left")
        return (1.0 + at_least) / (len(cal) + 1.0)

    def p_values(self, images: Any) -> np.ndarray:
        """(M,) float64 conformal p-values (1 + #{calibration scores >= s}) / (n + 1), in (0, 1]: for normal
        images exchangeable with the bank they are uniform; small = anomalous."""
        return self._p_values(self.score(images))

    def _labels(self, rows: np.ndarray) -> np.ndarray:
        bank_rows = self._kept[rows]
        if self._paths is not None:
            return np.asarray(self._paths, dtype=str)[bank_rows]
        return self._ids[bank_rows]

    def neighbours(self, images: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels (M, k), squared distances (M, k) float32) of the k (default: config.k) nearest bank images,
        nearest first; labels are paths (str) when the bank has them, else ids (int64)."""
        k = self._check_k(k)
        d, i = self._knn(self._query_features(images, "images"), k)
        return self._labels(i), d

    def query_features(self, features: Any, k: int | None = None) -> Query:
        """`query` for (M, D) raw features."""
        k = self._check_k(k)
        return self._query(self._prepare(features, "features"), k)

    def query(self, images: Any, k: int | None = None) -> Query:
        """Scores, p-values, decisions and the k (default: config.k) nearest bank images of `images`, from one
        embedding and one kNN pass."""
        k = self._check_k(k)
        return self._query(self._query_features(images, "images"), k)

    def _query(self, feats: np.ndarray, k: int) -> Query:
        d, i = self._knn(feats, max(k, self.k))
        scores = d[:, : self.k].mean(axis=1, dtype=np.float32)
        return Query(scores=scores, p_values=self._p_values(scores), anomalous=scores > np.float32(self.threshold),
                     neighbours=self._labels(i[:, :k]), neighbour_sq_dists=d[:, :k])

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Saves the detector as one directory (config, feature identity, bank, ids/paths, calibration),
        written to a temporary sibling and renamed into place. An existing `path` is refused unless
        `overwrite` (and then only if it is a saved detector). A relative `weights` path is saved absolute.
        Returns the absolute path."""
        from dn2_jax import fileio, store

        features, kept = self._fitted()
        path = Path(path).absolute()
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise DN2Error(f"'{path}' already exists; pass overwrite=True to replace it")
            if not (path / MANIFEST).is_file():
                raise DN2Error(f"'{path}' exists and is not a saved detector; refusing to overwrite it")
        if path.parent.exists() and not path.parent.is_dir():
            raise DN2Error(f"'{path}': its parent '{path.parent}' is not a directory")
        identity = self._pipe().identity
        config = self.config.to_dict()
        if config["weights"] is not None:
            config["weights"] = str(Path(config["weights"]).absolute())
        features, bank_ids, kept, extra = self._saved_parts()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "identity": identity,
            "count": int(len(features)),
            "bank_size": int(len(kept)),
            "dim": int(features.shape[1]),
            "threshold": self.threshold,
            "contamination": self._contamination,
            "paths": self._paths,
            **extra,
        }
        meta = {**identity, "dataset": "detector", "compute_dtype": self.config.dtype,
                "normalized": self.config.normalize}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = fileio.temporary_dir(path)
        except OSError as e:
            raise DN2FileError(f"cannot write the detector '{path}': {e}") from e
        try:
            store.write_store(tmp / "bank", features, metadata={**meta, "split": "bank"}, ids=bank_ids)
            store.write_store(tmp / "calibration", self._calibration[:, None],
                              metadata={**meta, "split": "calibration"}, ids=kept)
            _write_manifest(tmp / MANIFEST, manifest)
            fileio.publish_dir(tmp, path, overwrite=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _saved_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """What `save` writes: (bank store rows (R, D), their ids (R,), the calibration store's ids (n,), more
        manifest entries)."""
        features, kept = self._fitted()
        return features, self._ids, kept, {}

    @staticmethod
    def saved_config(path: str | os.PathLike) -> DetectorConfig:
        """The config a detector was saved with, read from its manifest only (no bank, no backbone)."""
        path = Path(path).absolute()
        manifest = _read_manifest(path)
        try:
            return DetectorConfig.from_dict(manifest["config"])
        except DN2Error as e:
            raise DN2FileError(f"detector '{path}': its saved config is invalid ({e})") from e

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> Detector:
        """A saved detector. `overrides` may change settings that leave the bank valid: `weights` (must
        resolve to the saved fingerprint), `batch_size`, `fpr`, and `k` (the calibration is recomputed).
        Raises DN2FileError for a path that is not a saved detector and DN2Error when the weights the config
        resolves to differ from those the detector was fitted with."""
        path = Path(path).absolute()
        if cls is Detector and cls.saved_config(path).level == "patch":
            from dn2_jax.patch_detector import PatchDetector

            return PatchDetector.load(path, **overrides)
        det, manifest, features, ids, kept, calibration = cls._load_parts(path, overrides,
                                                                           ("weights", "batch_size", "fpr", "k"))
        saved_config = cls.saved_config(path)
        paths = manifest.get("paths")
        if (len(features) != manifest["count"] or features.shape[1] != manifest["dim"]
                or len(kept) != manifest["bank_size"] or (paths is not None and len(paths) != len(features))
                or np.any(kept < 0) or np.any(kept >= len(features))):
            raise DN2FileError(f"detector '{path}' is damaged: its bank, calibration and {MANIFEST} disagree")
        k = det.config.score_k(len(kept))
        if k > len(kept) - 1:
            raise DN2Error(f"k={k} needs a bank of at least {k + 1} images, this detector's has {len(kept)}")
        det._install(features, ids, paths, kept, calibration if det.config.k == saved_config.k else None)
        det._contamination = manifest.get("contamination")
        return det

    @classmethod
    def _load_parts(cls, path: Path, overrides: dict[str, Any], allowed: tuple[str, ...]) -> tuple[Any, ...]:
        """(a detector of the saved config with `overrides` (only `allowed` ones; its features checked against
        the saved identity), manifest, bank rows, their ids, calibration ids, calibration scores)."""
        from dn2_jax import store

        manifest = _read_manifest(path)
        saved_config = cls.saved_config(path)
        if bad := [name for name in overrides if name not in allowed]:
            _check_field_names(bad)
            raise DN2Error(f"{', '.join(bad)} cannot change for a saved detector (it changes its features or "
                           f"bank); settings that can: {', '.join(allowed)}")
        det = cls(saved_config.replace(**overrides))
        saved = manifest["identity"]
        now = det.identity
        if now["fingerprint"] != saved["fingerprint"]:
            raise DN2Error(
                f"detector '{path}' was fitted with {saved['backbone']} weights of fingerprint "
                f"{saved['fingerprint'][:12]}… (weights={saved_config.weights!r}), but weights="
                f"{det.config.weights!r} resolves to fingerprint {now['fingerprint'][:12]}…; pass the weights "
                "it was fitted with")
        if now != saved:
            diffs = "; ".join(f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}" for key in now
                              if now[key] != saved.get(key))
            raise DN2Error(f"detector '{path}' was fitted with other features than this dn2_jax computes: {diffs}")
        try:
            bank = store.open_store(path / "bank", expect=saved)  # arrays are checked (sha256) as they are read
            cal = store.open_store(path / "calibration", expect=saved)
            features, ids = bank.embeddings(), bank.ids
            kept, calibration = cal.ids, cal.embeddings()[:, 0]
        except (DN2Error, DN2FileError) as e:
            raise DN2FileError(f"detector '{path}' is damaged: {e}") from e
        return det, manifest, features, ids, kept, calibration


def _check_ids(ids: Any, n: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.shape != (n,) or not (np.issubdtype(a.dtype, np.integer) or (a.size == 0 and a.dtype == float)):
        raise DN2Error(f"ids must be {n} integers (one per image), got shape {a.shape} {a.dtype}")
    return a.astype(np.int64)


def _check_paths(paths: Any, n: int) -> list[str]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, (Sequence, np.ndarray)):
        raise DN2Error(f"paths must be a list of {n} strings, got {type(paths).__name__}")
    out = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in paths]
    if len(out) != n or not all(isinstance(p, str) for p in out):
        raise DN2Error(f"paths must be {n} strings (one per image), got {len(out)} items")
    return out


def _write_manifest(file: Path, manifest: dict[str, Any]) -> None:
    file.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise DN2FileError(f"detector '{path}' does not exist")
    file = path / MANIFEST
    if not path.is_dir() or not file.is_file():
        raise DN2FileError(f"'{path}' is not a saved detector (no {MANIFEST}); save one with Detector.save")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DN2FileError(f"detector '{path}' is damaged: {MANIFEST} cannot be read ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DN2FileError(f"'{path}' is not a saved detector ({MANIFEST} is not a {FORMAT} manifest)")
    version = manifest.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise DN2FileError(f"detector '{path}' has format version {version}; this dn2_jax reads versions "
                           f"{', '.join(map(str, _READABLE_VERSIONS))}")
    keys = {"config": dict, "identity": dict, "count": int, "bank_size": int, "dim": int}
    if bad := [key for key, t in keys.items() if not isinstance(manifest.get(key), t)]:
        raise DN2FileError(f"detector '{path}' is damaged: {MANIFEST} lacks {', '.join(bad)}")
    contamination = manifest.get("contamination")
    if contamination is not None and not (isinstance(contamination, float) and 0 <= contamination < 1):
        raise DN2FileError(f"detector '{path}' is damaged: its contamination {contamination!r} is not in [0, 1)")
    if version == 1:
        manifest["config"] = _config_from_v1(manifest["config"])
    return manifest


def _config_from_v1(config: dict[str, Any]) -> dict[str, Any]:
    """A format-1 config in today's terms: there clean_fraction (0.5) was set even without cleaning and the
    paper rule's leave-one-out k defaulted to the scoring k."""
    config = dict(config)
    if config.get("clean") == "none":
        config["clean_fraction"] = config["clean_k"] = None
    elif config.get("clean_k") is None:
        config["clean_k"] = config.get("k", 2)
    return config


__all__ = ["Detector", "DetectorConfig", "Query"]
