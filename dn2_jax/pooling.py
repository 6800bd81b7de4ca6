"""Orderless set pooling for group anomaly detection (paper 3.3): per-image features of a set -> one vector.

Pools (``SET_POOLS``); every one is invariant to the order of the images in a set:
  mean        the paper's: the mean of the set's features (equals :func:`dn2_jax.knn.pool_groups`).
  hist        soft prototype histogram: each image is softly assigned to P prototypes (k-means centres of the
              normal train images) by ``softmax(-||x - c_p||^2 / T)``; the set's feature is the mean of its
              images' assignments, a P-bin histogram of what the set is made of. T is TEMPERATURE_SCALE times
              the mean squared distance of the train images to their nearest prototype (fitted with them).
  std         per-dimension standard deviation over the set (a second-order statistic).
  max         per-dimension maximum over the set.
  comp        composition distribution: each image gets a posterior over M "kinds" (M = the set size), and the
              set's feature is the probability of each composition (how many images of each kind the set holds,
              C(2M - 1, M) of them) under independent per-image posteriors. The kinds are fitted on the NORMAL
              TRAIN SETS with one assumption: a normal set's images are of distinct kinds (a set of M classes,
              one image each, as the paper's composition protocol). Fit: seeded k-means++, then Lloyd steps
              whose assignment gives each set's M images M distinct kinds (the least-cost of the M!
              assignments), then a shared-covariance Gaussian (scikit-learn's LinearDiscriminantAnalysis,
              Ledoit-Wolf shrinkage) refitted on those labels and re-assigned under the same constraint for up
              to COMP_LDA_ROUNDS rounds; the posterior is its softmax(x W^T + b). Test sets are never
              constrained: an anomalous set (one kind missing, another doubled) puts its mass on another
              composition. Its DN2 score averages over a share of the normal train sets (``SCORE_SHARE``),
              not the paper's k = 2: a few normal train sets whose images were mis-assigned look like
              anomalies, and k = 2 would find them.
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
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.errors import DN2Error
from dn2_jax.knn import knn, pool_groups

#: Pool names accepted by :func:`fit_set_pool`.
SET_POOLS: tuple[str, ...] = ("mean", "hist", "comp", "std", "max", "mean+hist", "mean+std", "mean+hist+std")
#: The pool the validation study found best (``scripts/study_group.py``: full-size Fashion-MNIST validation split
#: carved out of train, 1,000 normal train sets and 1,000 test sets per class): 'comp' scored with k = 5% of the
#: train sets, mean ROC-AUC 96.6 / 94.0 for sets of 3 / 5, against 91.3 / 88.2 for 'hist' (P = 8, the earlier
#: default) and 81.1 / 72.4 for the paper's mean pool. k = 2 / 20 / 100 / 300 gave 90.4 / 96.2 / 96.7 / 96.8 (M = 3)
#: and 88.3 / 93.5 / 93.8 / 93.0 (M = 5); 5% (k = 50) has the best mean over the two sizes.
DEFAULT_POOL: str = "comp"
#: The soft assignment's temperature T is this times the mean squared distance of the train images to their
#: nearest prototype (chosen on the validation split, scripts/study_group.py).
TEMPERATURE_SCALE: float = 0.3
#: Lloyd iterations of the k-means (it stops earlier when the assignment no longer changes).
KMEANS_ITERS: int = 50
#: 'comp': largest set size (its fit enumerates the M! ways to give a set's images distinct kinds).
MAX_COMP_SET: int = 6
#: 'comp': rounds of the shared-covariance refinement of the kinds (it stops earlier when no label changes).
COMP_LDA_ROUNDS: int = 5
#: Pools whose DN2 score averages over this share of the normal train sets (at least 2) when no k is given
#: (`SetPool.score_k`); the others use the paper's k = 2.
SCORE_SHARE: dict[str, float] = {"comp": 0.05}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SetPool:
    """A fitted orderless pool; call it as ``pool(features (N, D), groups (G, M) int) -> (G, D')`` float32.

    Attributes:
      prototypes: (P, D) float32 k-means centres of the normal train images (None when no part needs them).
      temperature: float32 scalar T of the soft assignment (squared feature units; 1 when unused).
      name: the pool name, one of ``SET_POOLS`` (static).
      coef, intercept: 'comp' only: (M, D) and (M,) float32, the kinds' posterior softmax(x coef^T + intercept).
    """

    prototypes: jax.Array | None
    temperature: jax.Array
    name: str = dataclasses.field(metadata=dict(static=True), default="mean")
    coef: jax.Array | None = None
    intercept: jax.Array | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.name.split("+"))

    def score_k(self, n_sets: int) -> int:
        """The DN2 score's k over n_sets pooled normal train sets when none is given: ``SCORE_SHARE`` of them
        (at least 2) for the pools listed there, else the paper's 2."""
        share = SCORE_SHARE.get(self.name)
        return 2 if share is None else max(2, round(share * n_sets))

    def assignments(self, features) -> jax.Array:
        """(N, D) features -> (N, P) float32 soft assignments to the prototypes (rows sum to 1); for 'comp'
        (N, M) posteriors over its kinds."""
        if self.coef is not None:
            x = _check_features(features, "features")
            return jax.nn.softmax(x @ self.coef.T + self.intercept, axis=1)
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
        fitted = self.prototypes if self.prototypes is not None else self.coef
        if fitted is not None and fitted.shape[1] != features.shape[1]:
            raise DN2Error(f"features have dimension {features.shape[1]}, the pool was fitted on "
                           f"{fitted.shape[1]}")
        if self.coef is not None and groups.shape[1] != self.coef.shape[0]:
            raise DN2Error(f"pool 'comp' was fitted on sets of {self.coef.shape[0]} images, got sets of "
                           f"{groups.shape[1]}")
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
            elif part == "comp":
                v = composition_probs(jnp.take(self.assignments(features), groups, axis=0))
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


def compositions(m: int, p: int) -> list[tuple[int, ...]]:
    """The count vectors (c_1..c_p) with sum m, in lexicographic order: what a set of m images can hold of p
    kinds (the entries of a 'comp' pooled feature)."""
    return [c for c in itertools.product(range(m + 1), repeat=p) if sum(c) == m]


@jax.jit
def composition_probs(posteriors) -> jax.Array:
    """(G, M, P) per-image posteriors over P kinds -> (G, C) float32 probability of each composition
    (``compositions(M, P)`` order) of each set, the images drawn independently. Invariant to the order of a
    set's images (a product of the images' generating polynomials, expanded one image at a time)."""
    g, m, p = posteriors.shape
    state, prev = jnp.ones((g, 1), jnp.float32), [(0,) * p]
    for t in range(m):
        comps = compositions(t + 1, p)
        where = {c: i for i, c in enumerate(prev)}
        idx = np.full((len(comps), p), -1, np.int64)  # row of (comp - e_j) among the previous compositions
        for i, c in enumerate(comps):
            for j in range(p):
                if c[j] > 0:
                    idx[i, j] = where[c[:j] + (c[j] - 1,) + c[j + 1:]]
        gathered = jnp.take(state, jnp.asarray(np.maximum(idx, 0)), axis=1)  # (G, C_t+1, P)
        terms = gathered * posteriors[:, t, None, :] * jnp.asarray(idx >= 0, jnp.float32)
        state, prev = terms.sum(axis=2), comps
    return state


@jax.jit
def _distinct_kinds(cost, perms) -> jax.Array:
    """(G, M) kinds of each set's images: of the assignments ``perms`` (Q, M) of distinct kinds, the one with
    the least total ``cost`` (G, M, M) (image, kind)."""
    idx = jnp.broadcast_to(perms.T[None], (cost.shape[0], *perms.T.shape))  # (G, M, Q)
    total = jnp.take_along_axis(cost, idx, axis=2).sum(axis=1)  # (G, Q)
    return perms[jnp.argmin(total, axis=1)]


def _lda_logits(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W (M, D), b (M,)): a shared-covariance Gaussian of the labelled rows (Ledoit-Wolf shrinkage), whose
    posterior is softmax(x W^T + b)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, labels)
    coef, intercept = np.asarray(lda.coef_, np.float64), np.asarray(lda.intercept_, np.float64)
    if coef.shape[0] == 1:  # two kinds: scikit-learn keeps the log-odds of the second only
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    return coef, intercept


def _fit_kinds(x: jax.Array, sets: np.ndarray, seed: int) -> tuple[jax.Array, jax.Array]:
    """The 'comp' pool's (coef (M, D), intercept (M,)) from normal train image features x (N, D) and the normal
    train sets (G, M) (indices into x); see the module docstring."""
    g, m = sets.shape
    flat = jnp.take(x, jnp.asarray(sets.reshape(-1)), axis=0)  # (G*M, D), set-major
    perms = jnp.asarray(list(itertools.permutations(range(m))), jnp.int32)
    c, labels = kmeans(flat, m, seed=seed), None
    for _ in range(KMEANS_ITERS):  # Lloyd steps under the constraint
        d = knn(flat, c, m)  # every centre, nearest first
        cost = jnp.zeros((flat.shape[0], m)).at[jnp.arange(flat.shape[0])[:, None], d[1]].set(d[0])
        new = np.asarray(_distinct_kinds(cost.reshape(g, m, m), perms)).reshape(-1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        c = jax.ops.segment_sum(flat, jnp.asarray(labels), num_segments=m) / (g * 1.0)  # each kind: G images
    xs = np.asarray(flat, np.float64)
    for _ in range(COMP_LDA_ROUNDS):
        coef, intercept = _lda_logits(xs, labels)
        new = np.asarray(_distinct_kinds(jnp.asarray(-(xs @ coef.T + intercept), jnp.float32).reshape(g, m, m),
                                         perms)).reshape(-1)
        if (new == labels).all():
            break
        labels = new
    coef, intercept = _lda_logits(xs, labels)
    return jnp.asarray(coef, jnp.float32), jnp.asarray(intercept, jnp.float32)


def fit_set_pool(train_features, pool: str = DEFAULT_POOL, *, prototypes: int = 8, seed: int = 0,
                 sets=None) -> SetPool:
    """Fits an orderless set pool on (N, D) features of NORMAL train images (the images of the normal sets).

    Args:
      train_features: (N, D) float features of normal train images (never test images).
      pool: one of ``SET_POOLS``; default ``DEFAULT_POOL``.
      prototypes: P, the number of k-means prototypes of the 'hist' part (unused by the others), P <= N.
      seed: seed of the k-means++ initialisation.
      sets: (G, M) int indices into train_features: the normal train sets; 'comp' is fitted on them (each
        set's images are taken to be of distinct kinds; 2 <= M <= ``MAX_COMP_SET``); the others ignore them.

    Returns:
      a :class:`SetPool`. DN2Error for an unknown pool, more prototypes than images, or 'comp' without valid
      sets.
    """
    if pool not in SET_POOLS:
        raise DN2Error(f"unknown set pool {pool!r}; choose one of {', '.join(SET_POOLS)}")
    x = _check_features(train_features, "train_features")
    if pool == "comp":
        if sets is None:
            raise DN2Error("pool 'comp' is fitted on the normal train sets: pass sets=(G, M) indices into "
                           "train_features")
        sets = np.asarray(sets)
        if sets.ndim != 2 or 0 in sets.shape or not np.issubdtype(sets.dtype, np.integer):
            raise DN2Error(f"sets must be a non-empty (G, M) integer array, got {sets.dtype} {sets.shape}")
        if sets.min() < 0 or sets.max() >= x.shape[0]:
            raise DN2Error(f"sets index train_features 0..{x.shape[0] - 1}, got [{sets.min()}, {sets.max()}]")
        if not 2 <= sets.shape[1] <= MAX_COMP_SET:
            raise DN2Error(f"pool 'comp' takes sets of 2 to {MAX_COMP_SET} images (its fit tries every way to "
                           f"give a set's images distinct kinds), got sets of {sets.shape[1]}")
        if sets.shape[0] < 2:
            raise DN2Error(f"pool 'comp' needs at least 2 normal train sets, got {sets.shape[0]}")
        coef, intercept = _fit_kinds(x, sets, seed)
        return SetPool(None, jnp.float32(1.0), pool, coef, intercept)
    if "hist" not in pool.split("+"):
        return SetPool(None, jnp.float32(1.0), pool)
    c = kmeans(x, prototypes, seed=seed)
    nearest = knn(x, c, 1)[0][:, 0]
    temperature = jnp.maximum(TEMPERATURE_SCALE * jnp.mean(nearest), 1e-12).astype(jnp.float32)
    return SetPool(c, temperature, pool)
