"""dn2-jax: Deep Nearest Neighbor Anomaly Detection (Bergman, Cohen & Hoshen, 2020) in JAX/Flax.

Stages: data (`load_dataset`, protocols) -> preprocessing + backbones (`get_backbone`, `load_variables`)
-> embedding (`embed`, `make_embed_fn`) -> stores (`extract_to_store`, `open_store`) -> DN2 math (`knn_score`,
`clean`, `pool_groups`, `threshold`) -> evaluation (`roc_auc`, `evaluate`).
`Detector` ties them into one object: fit / score / predict / p_values / neighbours / save / load.
Beyond the paper: robust cleaning (`clean_bank`), set pools (`fit_set_pool`), feature adaptation
(`dn2_jax.adapt`: PANDA, Mean-Shifted), patch-level kNN with anomaly maps (`dn2_jax.patch`, `coreset_select`).
"""

__version__ = "0.1.0"

from dn2_jax.adapt import AdaptConfig, adapt_to_weights
from dn2_jax.cleaning import (
    CLEAN_RULES,
    DEFAULT_CLEAN,
    CleanResult,
    clean_bank,
    estimate_contamination,
    sharded_clean_bank,
)
from dn2_jax.convert import convert_checkpoint, load_variables, restore_variables, save_variables
from dn2_jax.coreset import (
    coreset_select,
    coreset_select_numpy,
    coreset_select_stream,
    coreset_size,
    iter_row_chunks,
    random_projection,
)
from dn2_jax.data import (
    DATASET_NAMES,
    Dataset,
    FolderImages,
    PackedPaths,
    TfdsImages,
    decode_image,
    decode_images,
    load_dataset,
    load_tfds,
    max_image_pixels,
    open_images,
    tfds_prepare_command,
)
from dn2_jax.detector import Detector, DetectorConfig, Query
from dn2_jax.distributed import ProcessConfig
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
from dn2_jax.patch import (
    PatchConfig,
    PatchFn,
    PatchResult,
    aggregate_patches,
    anomaly_maps,
    build_bank,
    coreset_rows,
    default_layers,
    fit_patch_bank,
    image_scores,
    make_patch_fn,
    maps_figure,
    patch_scores,
    patchcore_scores,
    save_overlays,
    score_patch_images,
    to_model_frame,
    write_patches,
)
from dn2_jax.patch_detector import PatchDetector, fit_patch_detector, map_names, score_with_maps
from dn2_jax.pixel_metrics import aupro, load_mvtec_masks, mask_path, pixel_roc_auc, pro_curve
from dn2_jax.pooling import DEFAULT_POOL, SET_POOLS, SetPool, composition_probs, compositions, fit_set_pool
from dn2_jax.preprocessing import PRESETS, Preset, preprocess
from dn2_jax.protocols import (
    contaminated_bank,
    make_groups,
    mvtec_split,
    one_class,
    stratified_subsample,
    train_test_groups,
)
from dn2_jax.scoring import (
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
    PartedStore,
    check_store_path,
    extract_parts,
    extract_to_store,
    open_store,
    save_threshold,
    write_store,
)
from dn2_jax.synthetic import make_synthetic, write_synthetic_mvtec
from dn2_jax.torch_io import load_state_dict

__all__ = [
    "adapt_to_weights", "AdaptConfig", "aggregate_patches", "anomaly_maps", "approx_knn", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "aupro", "BACKBONES", "BackboneSpec", "bank_center", "blocked_knn",
    "build_bank", "check_exclude", "check_features", "check_store_path", "check_writable", "clean", "clean_bank",
    "CLEAN_RULES", "CleanResult", "clear_embed_cache", "composition_probs", "compositions",
    "contaminated_bank", "convert_checkpoint", "coreset_rows",
    "coreset_select", "coreset_select_numpy", "coreset_select_stream", "coreset_size", "data_mesh", "Dataset",
    "DATASET_NAMES", "dataset_source", "decode_image", "decode_images", "DEFAULT_CLEAN", "default_layers",
    "DEFAULT_POOL", "default_weights", "Detector", "DetectorConfig", "DN2Error", "DN2FileError", "embed",
    "EmbeddingStore", "estimate_contamination", "EvalConfig", "evaluate", "extract_parts", "extract_to_store",
    "fingerprint", "fit_detector", "fit_patch_bank", "fit_patch_detector", "fit_set_pool", "folder_source",
    "FolderImages", "fpr_quantile", "gallery", "get_backbone", "image_scores", "IncompleteStoreError",
    "init_random_variables", "iter_row_chunks", "keep_lowest", "knn", "knn_chunks", "knn_score", "l2_normalize",
    "load_dataset", "load_detector", "load_mvtec_masks", "load_state_dict", "load_tfds", "load_variables",
    "make_embed_fn", "make_groups", "make_patch_fn", "make_synthetic", "map_names", "maps_figure", "mask_path",
    "max_image_pixels", "mvtec_split", "one_class", "open_images", "open_store", "PackedPaths",
    "PartedStore", "patch_scores",
    "PatchConfig", "patchcore_scores", "PatchDetector", "PatchFn", "PatchResult", "pixel_roc_auc", "pool_groups",
    "pool_groups_by_id", "preprocess", "Preset", "PRESETS", "pro_curve", "ProcessConfig", "publish_dir", "Query",
    "random_projection", "read_tree_metadata", "restore_tree", "restore_variables", "roc_auc", "roc_curve",
    "save_overlays", "save_threshold", "save_tree", "save_variables", "score_patch_images", "score_source",
    "score_with_maps", "ScoreReport", "self_knn_score", "SET_POOLS", "SetPool", "shard_bank", "sharded_clean",
    "sharded_clean_bank", "sharded_knn", "sharded_knn_score", "sharded_self_knn_score", "sharded_threshold",
    "ShardedBank", "Source", "squared_norms", "store_source", "stratified_subsample", "tfds_prepare_command",
    "TfdsImages", "threshold", "to_model_frame", "train_test_groups", "write_patches", "write_report",
    "write_store", "write_synthetic_mvtec", "writer_lock",
]
