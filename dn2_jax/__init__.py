"""dn2-jax: Deep Nearest Neighbor Anomaly Detection (Bergman, Cohen & Hoshen, 2020) in JAX/Flax."""

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.knn import (
    clean,
    knn,
    knn_chunks,
    knn_score,
    pool_groups,
    pool_groups_by_id,
    self_knn_score,
    squared_norms,
    threshold,
)
from dn2_jax.metrics import roc_auc, roc_curve

__version__ = "0.1.0"

__all__ = [
    "DN2Error",
    "DN2FileError",
    "clean",
    "knn",
    "knn_chunks",
    "knn_score",
    "pool_groups",
    "pool_groups_by_id",
    "roc_auc",
    "roc_curve",
    "self_knn_score",
    "squared_norms",
    "threshold",
]
