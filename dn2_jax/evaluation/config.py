"""Settings of one evaluation run (`EvalConfig`, plain data saved in results.json) and their checks.

Each field's metadata holds its ``help`` text and, where a field only applies to some modes, ``modes``: the
`dn2` command derives its flags from these fields (see `dn2_jax.cli`).
"""

from __future__ import annotations

import dataclasses

from dn2_jax.cleaning import CLEAN_RULES, DEFAULT_CLEAN, PAPER_K
from dn2_jax.detector import LEVELS, PATCH_OPTIONS, DetectorConfig
from dn2_jax.errors import DN2Error
from dn2_jax.patch import REDUCTIONS
from dn2_jax.pooling import DEFAULT_POOL, MAX_COMP_SET, SET_POOLS

MODES = ("semi", "unsupervised", "group")
PIXELS = "pixels"  # raw-pixel baseline: the image itself, flattened, in [0, 1], through the same kNN path.
# The quick subsample `dn2 eval` runs without --full (a few minutes on 2 CPU cores); capped at what exists.
QUICK = {"bank_size": 100, "test_size": 1000}


def _detector_help(name: str) -> str:
    """The help text of `DetectorConfig` field `name` (one text for `dn2 eval` and `dn2 fit`)."""
    return DetectorConfig.__dataclass_fields__[name].metadata["help"]


def _field(default, help: str, modes: tuple[str, ...] | None = None, **extra):
    return dataclasses.field(default=default, metadata={"help": help, "modes": modes, **extra})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (plain data; saved in results.json)."""

    dataset: str = _field("fashion_mnist", "fashion_mnist, mnist, cifar10, cifar100, cifar100_fine, mvtec:PATH, "
                          "folder:PATH or tfds:NAME")
    backbone: str = _field("efficientnet_lite0", "efficientnet_lite0/1/2 (offline default), resnet18..152 "
                           "(needs --weights), or pixels (raw-pixel baseline)")
    weights: str | None = _field(None, "torchvision .pth/.safetensors or a `dn2 convert` output (ResNets)")
    mode: str = _field("semi", "semi (one-class, default), unsupervised (contaminated bank, cleaned) or group "
                       "(sets of images)", choices=MODES)
    k: int | None = _field(None, "neighbours averaged in the DN2 score (default: 2, the paper's; unsupervised with "
                           "--clean fixed: a share of the cleaned bank, see --clean; group with --group-pool comp: "
                           "a share of the normal train sets)")
    classes: tuple[int, ...] | None = _field(None, "normal classes to evaluate, e.g. 0,3,7 (default: all)")
    bank_size: int | None = _field(None, "train images per class in the bank (default: all)",
                                   ("semi", "unsupervised"))
    test_size: int | None = _field(None, "test images, class-stratified (default: all)", ("semi", "unsupervised"))
    quick: bool = _field(False, "a quick subsample when neither bank_size nor test_size is given: "
                         f"{QUICK['bank_size']} train images per class and {QUICK['test_size']} test images, each "
                         "capped at what the data has", ("semi", "unsupervised"))
    contamination: float = _field(0.0, "share of other-class images in the bank", ("unsupervised",))
    clean: str = _field(DEFAULT_CLEAN, f"cleaning rule of the contaminated bank: {', '.join(CLEAN_RULES)} ('none' = "
                        "no cleaning, 'paper' = the paper's rule; see dn2 fit --help); results.json also holds the "
                        "AUC without cleaning and with the paper's rule", ("unsupervised",), choices=CLEAN_RULES)
    clean_k: int | None = _field(None, "leave-one-out neighbours of the cleaning score, independent of --k "
                                 "(default: the rule's: paper 2, fixed/adaptive 10%% of the bank)", ("unsupervised",))
    clean_fraction: float | None = _field(None, "share of the bank the cleaning drops in all (adaptive: at most), "
                                          "in (0, 1) (default: the rule's; no cleaning is --clean none)",
                                          ("unsupervised",))
    clean_rounds: int | None = _field(None, "rounds of cleaning (default: the rule's)", ("unsupervised",))
    group_pool: str = _field(DEFAULT_POOL, f"orderless pooling of a set's image features: {', '.join(SET_POOLS)} "
                             "('mean' = the paper's; hist = soft histogram over k-means prototypes of the normal "
                             "train images; comp = distribution over compositions of kinds fitted on the normal "
                             "train sets, taking a normal set's images to be of distinct kinds); results.json also "
                             "holds the mean pool's and the pointwise AUC", ("group",), choices=SET_POOLS)
    prototypes: int = _field(8, "k-means prototypes of the 'hist' pool (fitted on the normal train images only)",
                             ("group",))
    group_size: int = _field(3, "images per set (M)", ("group",))
    train_groups: int = _field(200, "normal train sets (the bank)", ("group",))
    test_groups: int = _field(200, "test sets, half normal, half anomalous", ("group",))
    batch_size: int = _field(64, "images per backbone step")
    dtype: str = _field("float32", "compute dtype", choices=("float32", "bfloat16"))
    input_size: int | None = _field(None, "backbone input resolution (default: the backbone's preset)")
    normalize: bool = _field(True, "L2-normalise features before kNN (better on Fashion-MNIST/MNIST; see README)")
    seed: int = _field(0, "seed of the subsamples and sets")
    data_dir: str | None = _field(None, "where local dataset files or a prepared tfds data_dir live")
    skip_bad_images: bool = _field(False, "leave out image files that cannot be decoded (listed on stderr and in "
                                   "results.json) instead of stopping at the first one")
    cache_dir: str | None = _field(None, "embedding stores reused across runs (None: no caching)")
    adapt: str | None = _field(None, "adapt the backbone to each normal class before DN2: panda or msc "
                               "(dn2_jax.adapt; slow on CPU)", ("semi",), choices=("panda", "msc"))
    adapt_epochs: int = _field(10, "adaptation epochs over the class's bank images", ("semi",))
    adapt_lr: float | None = _field(None, "adaptation learning rate (default: 1e-4 PANDA, 1e-5 MSC)", ("semi",))
    adapt_batch_size: int = _field(32, "images per adaptation step", ("semi",))
    level: str = _field("image", _detector_help("level") + "; at level patch results.json also holds pixel ROC-AUC "
                        "and AUPRO where the MVTec folder has ground_truth masks, and maps.png shows maps",
                        ("semi",), choices=LEVELS)
    layers: tuple[str, ...] | None = _field(None, _detector_help("layers"), ("semi",))
    pool: int | None = _field(None, _detector_help("pool"), ("semi",))
    proj_dim: int | None = _field(None, _detector_help("proj_dim"), ("semi",))
    coreset: float | None = _field(None, _detector_help("coreset"), ("semi",))
    reduce: str | None = _field(None, _detector_help("reduce"), ("semi",), choices=REDUCTIONS)
    sigma: float | None = _field(None, _detector_help("sigma"), ("semi",))

    @property
    def knn_k(self) -> int:
        """The k of scores made without a cleaning rule (one-class, group, adapted): --k, else the paper's 2.
        Unsupervised runs score through detectors, which resolve k per cleaning rule (`DetectorConfig.k`)."""
        return PAPER_K if self.k is None else int(self.k)

    def clean_config(self, rule: str | None = None) -> dict:
        """The detector settings of cleaning rule `rule` (default: this run's) with this run's options."""
        rule = self.clean if rule is None else rule
        if rule == "none":
            return {"clean": "none"}
        if rule == "paper":
            return {"clean": "paper"}  # the paper's exact rule: none of this run's options
        return {"clean": rule, "clean_k": self.clean_k, "clean_fraction": self.clean_fraction,
                "clean_rounds": self.clean_rounds}

    def detector_config(self, **changes):
        """The `DetectorConfig` of this run's features and kNN (what `dn2 fit` would deploy), with `changes`."""
        from dn2_jax.detector import DetectorConfig

        kw = dict(backbone=self.backbone, weights=self.weights, input_size=self.input_size, dtype=self.dtype,
                  normalize=self.normalize, k=self.k, batch_size=self.batch_size, level=self.level,
                  **{name: getattr(self, name) for name in PATCH_OPTIONS})
        return DetectorConfig(**{**kw, **changes})


def applies(name: str, mode: str) -> bool:
    """Whether EvalConfig field `name` is used in `mode`."""
    modes = EvalConfig.__dataclass_fields__[name].metadata.get("modes")
    return modes is None or mode in modes


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
        if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
            raise DN2Error(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("bank_size", "test_size", "input_size"):
        value = getattr(cfg, name)
        if value is not None and int(value) < 1:
            raise DN2Error(f"{name} must be >= 1, got {value}")
    if not 0.0 <= cfg.contamination < 1.0:
        raise DN2Error(f"contamination must be in [0, 1), got {cfg.contamination}")
    if cfg.mode == "unsupervised":
        _validate_cleaning(cfg)
    if cfg.mode == "group":
        if "hist" in cfg.group_pool.split("+"):
            if int(cfg.prototypes) < 1:
                raise DN2Error(f"prototypes must be >= 1, got {cfg.prototypes}")
        elif cfg.prototypes != EvalConfig.prototypes:
            raise DN2Error(f"prototypes only apply to a pool with 'hist', not group_pool={cfg.group_pool!r}")
    if cfg.mode == "group" and cfg.group_size < 2:
        raise DN2Error(f"group_size must be >= 2, got {cfg.group_size}")
    if cfg.mode == "group" and cfg.group_pool == "comp" and cfg.group_size > MAX_COMP_SET:
        raise DN2Error(f"group_pool 'comp' takes sets of at most {MAX_COMP_SET} images (its fit tries every way "
                       f"to give a set's images distinct kinds), got group_size={cfg.group_size}")
    if cfg.adapt is not None:
        from dn2_jax.evaluation.adapted import adapt_config

        if cfg.backbone == PIXELS:
            raise DN2Error("--adapt needs a network backbone; the pixels baseline has no weights to adapt")
        adapt_config(cfg)  # epochs, learning rate, batch size checked before any work
    if cfg.level == "patch" and cfg.adapt is not None:
        raise DN2Error("--adapt applies to --level image")
    cfg.detector_config()  # the detector's checks: level, patch settings (e.g. coreset in (0, 1]), backbone
    if cfg.dataset.startswith("mvtec:") and cfg.mode != "semi":
        raise DN2Error(f"mode '{cfg.mode}' is not defined for MVTec-style folders; use --mode semi")


def _validate_cleaning(cfg: EvalConfig) -> None:
    if cfg.clean_fraction is not None and cfg.clean_fraction == 0:
        raise DN2Error("clean_fraction must be in (0, 1), got 0; for no cleaning use clean='none' (--clean none)")
    options = [n for n in ("clean_k", "clean_fraction", "clean_rounds") if getattr(cfg, n) is not None]
    if cfg.clean in ("none", "paper") and options:
        raise DN2Error(f"{', '.join(options)} do not apply to cleaning rule {cfg.clean!r} ('paper' is the paper's "
                       "exact rule); use --clean fixed or adaptive")
    cfg.detector_config(**cfg.clean_config())  # the detector's checks (rule name, ranges), naming the field
