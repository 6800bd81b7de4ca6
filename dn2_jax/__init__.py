"""dn2-jax: Deep Nearest Neighbor Anomaly Detection (Bergman, Cohen & Hoshen, 2020) in JAX/Flax.

Stages: data (`load_dataset`, protocols) -> preprocessing + backbones (`get_backbone`, `load_variables`)
-> embedding (`embed`, `make_embed_fn`) -> stores (`extract_to_store`, `open_store`) -> DN2 math (`knn_score`,
`clean`, `pool_groups`, `threshold`) -> evaluation (`roc_auc`, `evaluate`).
`Detector` ties them into one object: fit / score / predict / p_values / neighbours / save / load.
"""

__version__ = "0.1.0"

from dn2_jax.cleaning import (
    CLEAN_RULES,
    DEFAULT_CLEAN,
    CleanResult,
    clean_bank,
    estimate_contamination,
    sharded_clean_bank,
)
from dn2_jax.convert import convert_checkpoint, load_variables, restore_variables, save_variables
from dn2_jax.data import DATASET_NAMES, Dataset, decode_image, decode_images, load_dataset, max_image_pixels
from dn2_jax.detector import Detector, DetectorConfig, Query
from dn2_jax.embedding import clear_embed_cache, embed, make_embed_fn
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.evaluation import EvalConfig, evaluate
from dn2_jax.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    publish_dir,
    read_tree_metadata,
    restore_tree,
    save_tree,
    writer_lock,
)
from dn2_jax.knn import (
    bank_center,
    blocked_knn,
    check_exclude,
    check_features,
    clean,
    fpr_quantile,
    keep_lowest,
    knn,
    knn_chunks,
    knn_score,
    l2_normalize,
    pool_groups,
    pool_groups_by_id,
    self_knn_score,
    squared_norms,
    threshold,
)
from dn2_jax.metrics import roc_auc, roc_curve
from dn2_jax.models import BACKBONES, BackboneSpec, default_weights, fingerprint, get_backbone, init_random_variables
from dn2_jax.pooling import DEFAULT_POOL, SET_POOLS, SetPool, fit_set_pool
from dn2_jax.preprocessing import PRESETS, Preset, preprocess
from dn2_jax.protocols import (
    contaminated_bank,
    make_groups,
    mvtec_split,
    one_class,
    stratified_subsample,
    train_test_groups,
)
from dn2_jax.sharding import (
    ShardedBank,
    approx_knn,
    data_mesh,
    shard_bank,
    sharded_clean,
    sharded_knn,
    sharded_knn_score,
    sharded_self_knn_score,
    sharded_threshold,
)
from dn2_jax.store import (
    EmbeddingStore,
    IncompleteStoreError,
    check_store_path,
    extract_to_store,
    open_store,
    save_threshold,
    write_store,
)
from dn2_jax.torch_io import load_state_dict

__all__ = [
    "BACKBONES", "DATASET_NAMES", "PRESETS", "BackboneSpec", "DN2Error", "DN2FileError", "Dataset", "EmbeddingStore",
    "EvalConfig", "IncompleteStoreError", "Preset", "approx_knn", "clean", "contaminated_bank", "convert_checkpoint",
    "data_mesh", "default_weights", "embed", "evaluate", "extract_to_store", "fingerprint", "fpr_quantile",
    "get_backbone", "init_random_variables", "keep_lowest", "knn", "knn_chunks", "knn_score", "l2_normalize",
    "load_dataset", "load_state_dict", "load_variables", "make_embed_fn", "make_groups", "mvtec_split", "one_class",
    "open_store", "pool_groups", "pool_groups_by_id", "preprocess", "restore_variables", "roc_auc", "roc_curve",
    "save_threshold", "save_variables", "self_knn_score", "shard_bank", "sharded_clean", "sharded_knn",
    "sharded_knn_score", "sharded_self_knn_score", "sharded_threshold", "squared_norms", "stratified_subsample",
    "threshold", "train_test_groups", "write_store",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_store_path", "check_writable",
    "publish_dir", "read_tree_metadata", "restore_tree", "save_tree", "writer_lock",
    "bank_center", "blocked_knn", "check_exclude", "check_features", "clear_embed_cache", "ShardedBank",
    "CLEAN_RULES", "DEFAULT_CLEAN", "CleanResult", "clean_bank", "estimate_contamination", "sharded_clean_bank",
    "DEFAULT_POOL", "SET_POOLS", "SetPool", "fit_set_pool",
]
__all__ += ["decode_image", "decode_images", "max_image_pixels"]
__all__ += ["Detector", "DetectorConfig", "Query"]
from dn2_jax.scoring import (  # noqa: E402  (the `dn2 fit` / `dn2 score` steps as library calls)
    ScoreReport,
    Source,
    dataset_source,
    fit_detector,
    folder_source,
    gallery,
    load_detector,
    score_source,
    store_source,
    write_report,
)

__all__ += ["ScoreReport", "Source", "dataset_source", "fit_detector", "folder_source", "gallery", "load_detector",
            "score_source", "store_source", "write_report"]
