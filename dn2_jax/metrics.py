"""Evaluation metrics on score arrays: a jit-able ROC-AUC (for JAX research code) and ROC curves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.errors import DN2Error

Array = jax.Array


@jax.jit
def _roc_auc(scores: Array, labels: Array) -> Array:
    scores = scores.astype(jnp.float32)
    is_pos = labels.astype(bool)
    n_pos = jnp.sum(is_pos)
    n_neg = scores.shape[0] - n_pos
    negatives = jnp.sort(jnp.where(is_pos, jnp.inf, scores))
    below = jnp.searchsorted(negatives, scores, side="left")  # negatives strictly below each score
    not_above = jnp.searchsorted(negatives, scores, side="right")  # ... and those tied with it
    wins = (below + jnp.minimum(not_above, n_neg)).astype(jnp.float32) / (2.0 * n_neg)
    return jnp.sum(jnp.where(is_pos, wins, 0.0)) / n_pos


def roc_auc(scores: Array, labels: Array) -> Array:
    """Area under the ROC curve; ``labels`` 1 = anomalous (positive), higher score = more anomalous.

    Computed as the Mann-Whitney statistic: the probability that a random anomaly outscores a random
    normal sample, ties counting one half. Pure jnp and jit-able (the wrapper validates concrete inputs).

    Args:
      scores: (N,) finite scores.
      labels: (N,) {0, 1} labels with at least one of each.

    Returns:
      float32 scalar in [0, 1].
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise DN2Error(
            f"scores and labels must be 1-d of the same length, got {scores.shape} and {labels.shape}"
        )
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.isin(lab, (0, 1)).all():
            raise DN2Error("labels must be 0 (normal) or 1 (anomalous)")
        if lab.min() == lab.max():
            raise DN2Error("ROC-AUC needs both normal (0) and anomalous (1) samples")
    if not isinstance(scores, jax.core.Tracer) and not np.isfinite(np.asarray(scores, np.float32)).all():
        raise DN2Error("scores contain NaN or Inf")
    return _roc_auc(scores, labels)


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as NumPy arrays, via scikit-learn (for plots)."""
    from sklearn.metrics import roc_curve as _sk_roc_curve

    return _sk_roc_curve(np.asarray(labels), np.asarray(scores, np.float64))
