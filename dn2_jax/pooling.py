"""Orderless set pooling for group anomaly detection (paper 3.3): per-image features of a set -> one vector.

Pools (``SET_POOLS``); every one is invariant to the order of the images in a set:
  mean        the paper's: the mean of the set's features (equals :func:`dn2_jax.knn.pool_groups`).
  hist        soft prototype histogram: each image is softly assigned to P prototypes (k-means centres of the
              normal train images) by ``softmax(-||x - c_p||^2 / T)``; the set's feature is the mean of its
              images' assignments, a P-bin histogram of what the set is made of. T is TEMPERATURE_SCALE times
              the mean squared distance of the train images to their nearest prototype (fitted with them).
  std         per-dimension standard deviation over the set (a second-order statistic).
  max         per-dimension maximum over the set.
  mean+hist, mean+std, mean+hist+std
              concatenations; each part is L2-normalised first so that every part weighs the same in the
              squared distance of the kNN (a part of norm 0 stays 0).

The prototypes are fitted on NORMAL TRAIN images only (:func:`fit_set_pool`), with k-means written in JAX:
seeded k-means++ initialisation then Lloyd iterations, the distances computed in blocks by
:func:`dn2_jax.knn.knn` (so memory stays O(block) whatever the number of train images).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.errors import DN2Error
from dn2_jax.knn import knn, pool_groups

#: Pool names accepted by :func:`fit_set_pool`.
SET_POOLS: tuple[str, ...] = ("mean", "hist", "std", "max", "mean+hist", "mean+std", "mean+hist+std")
#: The pool the validation study found best (``scripts/study_group.py``: Fashion-MNIST validation split carved
#: out of train; with P = 8 prototypes and TEMPERATURE_SCALE = 0.3, mean ROC-AUC 91.2 / 88.5 for sets of 3 / 5
#: against 79.3 / 71.8 for the paper's mean pool; concatenating the mean to it lowered it).
DEFAULT_POOL: str = "hist"
#: The soft assignment's temperature T is this times the mean squared distance of the train images to their
#: nearest prototype (chosen on the validation split, scripts/study_group.py).
TEMPERATURE_SCALE: float = 0.3
#: Lloyd iterations of the k-means (it stops earlier when the assignment no longer changes).
KMEANS_ITERS: int = 50


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SetPool:
    """A fitted orderless pool; call it as ``pool(features (N, D), groups (G, M) int) -> (G, D')`` float32.

    Attributes:
      prototypes: (P, D) float32 k-means centres of the normal train images (None when no part needs them).
      temperature: float32 scalar T of the soft assignment (squared feature units; 1 when unused).
      name: the pool name, one of ``SET_POOLS`` (static).
    """

    prototypes: jax.Array | None
    temperature: jax.Array
    name: str = dataclasses.field(metadata=dict(static=True), default="mean")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.name.split("+"))

    def assignments(self, features) -> jax.Array:
        """(N, D) features -> (N, P) float32 soft assignments to the prototypes (rows sum to 1)."""
        if self.prototypes is None:
            raise DN2Error(f"pool {self.name!r} has no prototypes")
        p = self.prototypes.shape[0]
        d, idx = knn(features, self.prototypes, p)  # every prototype, in blocks of the kNN kernel
        soft = jax.nn.softmax(-d / self.temperature, axis=1)  # (N, P), columns in order of distance
        return jnp.zeros_like(soft).at[jnp.arange(d.shape[0])[:, None], idx].set(soft)

    def __call__(self, features, groups) -> jax.Array:
        """Pooled set features (G, D') float32 of the sets ``groups`` (G, M) (indices into ``features`` (N, D)).

        D' is D for mean/std/max, P for hist, and the sum of the parts for a concatenation.
        """
        features = _check_features(features, "features")
        groups = np.asarray(groups) if not isinstance(groups, jax.Array) else groups
        if groups.ndim != 2 or 0 in groups.shape or not jnp.issubdtype(groups.dtype, jnp.integer):
            raise DN2Error(f"groups must be a non-empty (G, M) integer array, got {groups.dtype} {groups.shape}")
        if not isinstance(groups, jax.Array) and (groups.min() < 0 or groups.max() >= features.shape[0]):
            raise DN2Error(f"groups index images 0..{features.shape[0] - 1}, got range "
                           f"[{groups.min()}, {groups.max()}]")
        if self.prototypes is not None and self.prototypes.shape[1] != features.shape[1]:
            raise DN2Error(f"features have dimension {features.shape[1]}, the prototypes "
                           f"{self.prototypes.shape[1]}")
        groups = jnp.asarray(groups)
        sets = jnp.take(features, groups, axis=0)  # (G, M, D)
        out = []
        for part in self.parts:
            if part == "mean":
                v = pool_groups(sets)
            elif part == "std":
                v = jnp.std(sets, axis=1)
            elif part == "max":
                v = jnp.max(sets, axis=1)
            else:  # hist
                v = jnp.mean(jnp.take(self.assignments(features), groups, axis=0), axis=1)
            out.append(v)
        if len(out) == 1:
            return out[0].astype(jnp.float32)
        return jnp.concatenate([_unit(v) for v in out], axis=1).astype(jnp.float32)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_features(x, name: str) -> jax.Array:
    if not hasattr(x, "shape") or len(x.shape) != 2 or 0 in x.shape:
        raise DN2Error(f"{name} must be a non-empty (N, D) array, got shape {getattr(x, 'shape', None)}")
    x = jnp.asarray(x, jnp.float32)
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        raise DN2Error(f"{name} contains NaN or Inf")
    return x


def kmeans(features, prototypes: int, *, seed: int = 0, iters: int = KMEANS_ITERS) -> jax.Array:
    """k-means centres (P, D) float32 of (N, D) features: seeded k-means++ initialisation, then Lloyd steps.

    Distances come from :func:`dn2_jax.knn.knn` (blocked). An empty cluster keeps its previous centre.
    Deterministic for a seed. DN2Error when P > N.
    """
    x = _check_features(features, "train_features")
    n = x.shape[0]
    if isinstance(prototypes, bool) or not isinstance(prototypes, (int, np.integer)) or prototypes < 1:
        raise DN2Error(f"prototypes must be a positive integer, got {prototypes!r}")
    if prototypes > n:
        raise DN2Error(f"prototypes={prototypes} is more than the {n} normal train images they are fitted on")
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    centres = [x[jax.random.randint(sub, (), 0, n)]]
    d2 = knn(x, centres[0][None], 1)[0][:, 0]
    for _ in range(1, prototypes):  # k-means++: next centre drawn with probability ~ squared distance
        key, sub = jax.random.split(key)
        total = jnp.sum(d2)
        probs = d2 / total if float(total) > 0 else jnp.full((n,), 1.0 / n)
        c = x[jax.random.choice(sub, n, p=probs)]
        centres.append(c)
        d2 = jnp.minimum(d2, knn(x, c[None], 1)[0][:, 0])
    return _lloyd(x, jnp.stack(centres), iters=int(iters))


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(x: jax.Array, c: jax.Array, *, iters: int) -> jax.Array:
    """Lloyd steps from centres c until the assignment stops changing or ``iters`` steps."""
    p = c.shape[0]

    def step(state):
        i, c, assign, _ = state
        new = knn(x, c, 1)[1][:, 0]
        sums = jax.ops.segment_sum(x, new, num_segments=p)
        counts = jax.ops.segment_sum(jnp.ones(x.shape[0], jnp.float32), new, num_segments=p)
        c = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
        return i + 1, c, new, jnp.any(new != assign)

    init = (jnp.int32(0), c, jnp.full(x.shape[0], -1, jnp.int32), jnp.bool_(True))
    _, c, _, _ = jax.lax.while_loop(lambda s: (s[0] < iters) & s[3], step, init)
    return c


def fit_set_pool(train_features, pool: str = DEFAULT_POOL, *, prototypes: int = 8, seed: int = 0) -> SetPool:
    """Fits an orderless set pool on (N, D) features of NORMAL train images (the images of the normal sets).

    Args:
      train_features: (N, D) float features of normal train images (never test images).
      pool: one of ``SET_POOLS``; default ``DEFAULT_POOL``.
      prototypes: P, the number of k-means prototypes of the 'hist' part (unused by the others), P <= N.
      seed: seed of the k-means++ initialisation.

    Returns:
      a :class:`SetPool`. DN2Error for an unknown pool or more prototypes than images.
    """
    if pool not in SET_POOLS:
        raise DN2Error(f"unknown set pool {pool!r}; choose one of {', '.join(SET_POOLS)}")
    x = _check_features(train_features, "train_features")
    if "hist" not in pool.split("+"):
        return SetPool(None, jnp.float32(1.0), pool)
    c = kmeans(x, prototypes, seed=seed)
    nearest = knn(x, c, 1)[0][:, 0]
    temperature = jnp.maximum(TEMPERATURE_SCALE * jnp.mean(nearest), 1e-12).astype(jnp.float32)
    return SetPool(c, temperature, pool)
