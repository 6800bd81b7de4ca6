"""DN2 mathematics: blocked exact kNN, scores, cleaning, set pooling and thresholds.

Everything here is a pure function of arrays; it knows nothing about models, files or datasets.
Distances are *squared* Euclidean, in the units of the features squared, computed in float32 as
``||q||^2 - 2 q.b + ||b||^2`` with the matmul at full float32 precision and tiny negatives clamped to 0.

Centering: queries and bank are shifted by one centre ``c`` (default: the bank mean, :func:`bank_center`)
before the expansion above. Distances are translation invariant, so this changes nothing mathematically, but
the expansion cancels ``||q||^2`` and ``||b||^2`` against ``2 q.b``, and its float32 rounding scales with the
squared norms: a shared offset of 100 on unit-scale features gave 3e-3 relative error without centering.
One centre serves the whole bank (every block, every chunk of :func:`knn_chunks`, every shard).

The public boundary has two layers: the checked functions (:func:`knn`, :func:`knn_score`, ...) validate
their inputs (the ``check_*`` helpers, public for other modules) and call :func:`blocked_knn`, the jitted
kernel, which checks nothing.

Memory: the bank is scanned in blocks of ``block_size`` rows and the queries in blocks of ``query_block``
rows; a running top-k is merged block by block, so the working set is ``query_block x block_size`` floats
whatever the bank size N (an ``M x N`` distance matrix is never materialised).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dn2_jax.errors import DN2Error

Array = jax.Array

#: Default bank rows per block and query rows per block (upper bounds: blocks are balanced, see
#: ``balanced_block``). The distance tile is at most 2048 x 4096 float32 = 32 MB, plus the two operand tiles
#: (48 MB at D = 2048): large enough that the per-block bank copy and selection are ~10% of the matmul.
BLOCK_SIZE = 4096
QUERY_BLOCK = 2048


# --------------------------------------------------------------------------------------------------------
# Validation at the public boundary. Shape and dtype checks always run (they are static under jit); value
# checks (NaN/Inf, overflow, exclude ranges) run whenever the values are concrete, i.e. not inside someone
# else's jit trace: a traced input cannot be inspected without a host round trip, so it is not checked.


def is_traced(x) -> bool:
    """True when ``x`` is a JAX tracer (inside jit/vmap), whose values cannot be checked."""
    return isinstance(x, jax.core.Tracer)


def max_feature_magnitude(dim: int) -> float:
    """Largest ``|x|`` accepted in a (., dim) feature array: squared distances of centred features stay
    finite in float32. A centred value is at most ``2 max|x|``, a squared distance at most ``dim (4 max|x|)^2``
    (the bound of ``||q||^2 + 2|q.b| + ||b||^2``), so ``max|x| <= sqrt(float32 max / (16 dim))``: 1e17 at D=2048."""
    return float(np.sqrt(np.finfo(np.float32).max / (16.0 * max(int(dim), 1))))


@jax.jit
def _max_abs(x: Array) -> Array:
    # One fused pass, no (N, D) temporary; NaN propagates through max, Inf is the max.
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _check_values(x, name: str) -> None:
    if isinstance(x, jax.Array):
        peak = float(_max_abs(x))  # on device: no host copy of a possibly multi-GB bank
    else:
        peak = max(float(np.max(x)), -float(np.min(x)))  # two passes, no |x| temporary
    if not np.isfinite(peak):
        raise DN2Error(f"{name} contains NaN or Inf")
    limit = max_feature_magnitude(x.shape[-1])
    if peak > limit:
        raise DN2Error(
            f"{name} has values up to {peak:.3g}; squared distances of D={x.shape[-1]} features beyond "
            f"{limit:.3g} overflow float32: rescale the features"
        )


def check_features(x, name: str, rank: int = 2) -> Array:
    """Validates a feature array and returns it (NumPy input stays NumPy, JAX stays JAX).

    Raises :class:`DN2Error` naming ``name`` unless ``x`` has rank ``rank`` ((N, D), or (G, M, D) for 3), is
    non-empty, real numeric, and (when concrete) finite with ``max|x| <= max_feature_magnitude(D)``.
    """
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim != rank:
        shape_doc = "(N, D)" if rank == 2 else "(G, M, D)"
        raise DN2Error(f"{name} must have rank {rank} {shape_doc}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DN2Error(f"{name} is empty (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise DN2Error(f"{name} has feature dimension 0")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise DN2Error(f"{name} must be a real numeric array, got dtype {x.dtype}")
    if not is_traced(x):
        _check_values(x, name)
    return x


def check_k(k, n: int, what: str) -> int:
    """``k`` as an int, or :class:`DN2Error` unless it is an integer in ``[1, n]`` (``what`` names n)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise DN2Error(f"k must be an integer, got {k!r}")
    if k < 1:
        raise DN2Error(f"k must be >= 1, got {k}")
    if k > n:
        raise DN2Error(f"k={k} is larger than {what} ({n})")
    return int(k)


def check_fraction(value, name: str) -> float:
    """``value`` as a float, or :class:`DN2Error` unless it lies in the open interval (0, 1)."""
    if not 0.0 < float(value) < 1.0:
        raise DN2Error(f"{name} must be in the open interval (0, 1), got {value}")
    return float(value)


def check_positive_int(value, name: str) -> int:
    """``value`` as an int, or :class:`DN2Error` unless it is a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DN2Error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_exclude(exclude, m: int, n: int) -> Array | None:
    """Validates a leave-one-out ``exclude`` for m queries against a bank of n rows; returns int32 (M,) or None.

    ``exclude`` (array or sequence) must be integers of shape (m,) with values in ``[-1, n)`` (-1: exclude
    nothing); a float, a bool, a negative other than -1 or a row >= n (e.g. 2**32, which int32 would wrap)
    raises :class:`DN2Error`. Values are checked when concrete (not traced). NumPy/sequence input comes back
    as a NumPy int32 array, JAX input as a JAX int32 array.
    """
    if exclude is None:
        return None
    if not hasattr(exclude, "shape"):
        exclude = np.asarray(exclude)
    if tuple(exclude.shape) != (m,) or exclude.dtype == bool or not jnp.issubdtype(exclude.dtype, jnp.integer):
        raise DN2Error(f"exclude must be an integer array of shape ({m},), got {exclude.dtype} {tuple(exclude.shape)}")
    if not is_traced(exclude) and m:
        lo, hi = (int(v) for v in ((exclude.min(), exclude.max()) if isinstance(exclude, np.ndarray)
                                   else _min_max(exclude)))
        if lo < -1 or hi >= n:
            raise DN2Error(f"exclude must hold bank rows in [0, {n}) or -1 (none), got values in [{lo}, {hi}]")
    return exclude.astype(np.int32) if isinstance(exclude, np.ndarray) else exclude.astype(jnp.int32)


@jax.jit
def _min_max(x: Array) -> tuple[Array, Array]:
    return jnp.min(x), jnp.max(x)


def _check_same_dim(queries: Array, bank: Array) -> None:
    if queries.shape[-1] != bank.shape[-1]:
        raise DN2Error(
            f"queries and bank differ in feature dimension: {queries.shape[-1]} vs {bank.shape[-1]}"
        )


# --------------------------------------------------------------------------------------------------------
# The kernel.


def _merge_topk(dists: Array, idx: Array, new_d: Array, new_i: Array, k: int) -> tuple[Array, Array]:
    """Merges two candidate lists (rows ascending or not) into the k smallest, lower index first on ties."""
    d = jnp.concatenate([dists, new_d], axis=1)
    i = jnp.concatenate([idx, new_i], axis=1)
    neg, pos = lax.top_k(-d, k)
    return -neg, jnp.take_along_axis(i, pos, axis=1)


#: Columns per group in the two-stage block selection (see :func:`_block_topk`).
_GROUP = 16


def _block_topk(d: Array, k: int) -> tuple[Array, Array]:
    """k smallest of each row of ``d`` (qb, b), ascending, lower column first on ties: (values, columns).

    ``lax.top_k`` over a whole CPU tile is a single-threaded partial sort that costs ~10% of the tile's
    matmul at D=2048. Instead, when the shape allows, take the minimum of each contiguous group of
    ``_GROUP`` columns (a vectorised reduction), pick the k groups with the smallest minima (ties: lower
    group), and run top_k on just their ``k * _GROUP`` columns, laid out in ascending column order. This is
    exact, ties included: every one of the k chosen groups holds an element that precedes, in
    (value, column) order, any element of an unchosen group.
    """
    qb, b = d.shape
    g = _GROUP
    if b % g or b // g < 4 * k:
        neg, pos = lax.top_k(-d, k)
        return -neg, pos
    groups = d.reshape(qb, b // g, g)
    _, best_groups = lax.top_k(-jnp.min(groups, axis=2), k)
    best_groups = jnp.sort(best_groups, axis=1)  # ascending group -> candidates in ascending column order
    cand = jnp.take_along_axis(groups, best_groups[:, :, None], axis=1).reshape(qb, k * g)
    cand_col = (best_groups[:, :, None] * g + jnp.arange(g, dtype=best_groups.dtype)).reshape(qb, k * g)
    neg, pos = lax.top_k(-cand, k)
    return -neg, jnp.take_along_axis(cand_col, pos, axis=1)


def balanced_block(total: int, block: int, multiple: int = 1) -> int:
    """Rows per block (static ints) for ``ceil(total / block)`` near-equal blocks (rounded up to ``multiple`` while that
    stays within ``block``), so a shifted last block re-scans few rows instead of up to ``block - 1``."""
    n_blocks = -(-total // block)
    even = -(-total // n_blocks)
    rounded = -(-even // multiple) * multiple
    return min(rounded if rounded <= block else even, total)


def block_starts(total: int, block: int) -> np.ndarray:
    """Start rows of ``ceil(total / block)`` blocks; the last one is shifted back so it stays in bounds."""
    starts = np.arange(0, total, block)
    return np.minimum(starts, total - block).astype(np.int32)


@functools.partial(
    jax.jit, static_argnames=("k", "block_size", "query_block", "recall_target", "reduction_size")
)
def blocked_knn(
    queries: Array,
    bank: Array,
    bank_sq: Array,
    center: Array | None,
    exclude: Array | None,
    *,
    k: int,
    block_size: int,
    query_block: int,
    recall_target: float | None = None,
    reduction_size: int | None = None,
) -> tuple[Array, Array]:
    """The blocked kNN kernel, jitted and unchecked: (M, k) ascending squared distances and bank row indices.

    This is the boundary for callers that validated their inputs already (:func:`knn`, the sharded search);
    it checks nothing, so wrong shapes fail inside XLA and bad values give wrong results.

    Args:
      queries: (M, D) float features; bank: (N, D); 1 <= k <= N, block_size >= k (static ints).
      bank_sq: (N,) float32 ``squared_norms(bank, center)`` (+inf marks a row that must never be returned).
      center: None, or (D,) float32 subtracted from queries and bank inside each tile (no centred copy of
        the bank is made); bank_sq must be the norms of the bank centred the same way.
      exclude: None, or (M,) int32 bank row that each query must not return (-1 = none).

    ``recall_target`` (opt-in) reduces each tile with ``lax.approx_min_k`` (TPU-KNN; approximate on TPU
    only, an exact top-k elsewhere), with ``reduction_size`` the bank size its recall refers to.
    """
    n, m = bank.shape[0], queries.shape[0]
    b = balanced_block(n, block_size, _GROUP)
    qb = balanced_block(m, query_block, 8)
    bank_starts = jnp.asarray(block_starts(n, b))
    query_starts = jnp.asarray(block_starts(m, qb))
    block_k = min(k, b)

    def one_query_block(q_start):
        q = lax.dynamic_slice_in_dim(queries, q_start, qb).astype(jnp.float32)
        if center is not None:
            q = q - center
        q_sq = jnp.sum(q * q, axis=1, keepdims=True)
        q_m2 = -2.0 * q  # exact (a power of two): the tile is then one matmul plus one add
        if exclude is not None:
            q_excl = lax.dynamic_slice_in_dim(exclude, q_start, qb)[:, None]

        def scan_bank(carry, xs):
            best_d, best_i = carry
            start, first_new = xs
            blk = lax.dynamic_slice_in_dim(bank, start, b).astype(jnp.float32)
            if center is not None:
                blk = blk - center
            col = start + jnp.arange(b, dtype=jnp.int32)
            # Rows of a shifted last block that an earlier block already covered never win: +inf norm.
            blk_sq = jnp.where(col < first_new, jnp.inf, lax.dynamic_slice_in_dim(bank_sq, start, b))
            # ||b||^2 - 2 q.b: the distance less ||q||^2, which is constant per query (added at the end).
            cross = jnp.dot(q_m2, blk.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            d = cross + blk_sq[None, :]
            if exclude is not None:
                d = jnp.where(col[None, :] == q_excl, jnp.inf, d)
            if recall_target is None:
                cand_d, pos = _block_topk(d, block_k)
            else:
                cand_d, pos = lax.approx_min_k(
                    d, block_k, recall_target=recall_target, reduction_input_size_override=reduction_size or -1
                )
            return _merge_topk(best_d, best_i, cand_d, start + pos.astype(jnp.int32), k), None

        init = (jnp.full((qb, k), jnp.inf, jnp.float32), jnp.full((qb, k), -1, jnp.int32))
        first_new = jnp.arange(bank_starts.shape[0], dtype=jnp.int32) * b
        (best_d, best_i), _ = lax.scan(scan_bank, init, (bank_starts, first_new))
        return jnp.maximum(best_d + q_sq, 0.0), best_i

    def scan_queries(carry, q_start):
        out_d, out_i = carry
        d, i = one_query_block(q_start)
        out_d = lax.dynamic_update_slice_in_dim(out_d, d, q_start, axis=0)
        out_i = lax.dynamic_update_slice_in_dim(out_i, i, q_start, axis=0)
        return (out_d, out_i), None

    init = (jnp.zeros((m, k), jnp.float32), jnp.zeros((m, k), jnp.int32))
    (out_d, out_i), _ = lax.scan(scan_queries, init, query_starts)
    return out_d, out_i


def bank_center(bank: Array) -> Array:
    """(N, D) -> (D,) float32 centre of the bank: its mean, snapped by :func:`snap_center`.

    The default centre of :func:`knn`. Computed on device as a float32 mean plus the mean of the residuals
    (two passes, no host copy): the second pass corrects the rounding the first accumulated. The same
    jitted computation runs eagerly and inside a jit trace, so both give the same bits. Compute it once per
    bank and pass it (with :func:`squared_norms`) to reuse it across calls.
    """
    return _bank_center(jnp.asarray(bank))


@jax.jit
def _bank_center(x: Array) -> Array:
    x = x.astype(jnp.float32)
    m0 = jnp.mean(x, axis=0)
    r = x - m0
    return snap_center(m0 + jnp.mean(r, axis=0), jnp.mean(jnp.abs(r), axis=0))


def snap_center(mean: Array, spread: Array) -> Array:
    """(D,) centre: each ``mean[j]`` rounded to a multiple of the largest power of two <= ``spread[j]`` (the
    column's mean absolute deviation); columns with zero spread keep the mean. Jit-able.

    The snapped centre is within half the spread of the mean, so it removes a shared offset as well as the
    mean does, and being a multiple of a power of two near the data's scale, subtracting it is exact for
    data on a coarse grid (e.g. quantised features): exactly tied distances stay exactly tied.
    """
    safe = jnp.where(spread > 0, spread, 1.0)
    step = jnp.exp2(jnp.floor(jnp.log2(safe)))
    return jnp.where(spread > 0, jnp.round(mean / step) * step, mean).astype(jnp.float32)


def squared_norms(bank: Array, center: Array | None = None) -> Array:
    """(N, D) -> (N,) float32 squared L2 norms of ``bank - center`` (default centre: :func:`bank_center`).

    Pass the result as ``bank_sq_norms`` to :func:`knn` together with the same ``center`` to reuse it.
    """
    bank = jnp.asarray(bank)
    center = bank_center(bank) if center is None else jnp.asarray(center, jnp.float32)
    return _squared_norms(bank, center)


@jax.jit
def _squared_norms(bank: Array, center: Array) -> Array:  # jitted: one fused pass, no (N, D) temporary
    x = bank.astype(jnp.float32) - center
    return jnp.sum(x * x, axis=1)


# --------------------------------------------------------------------------------------------------------
# Public API.


def knn(
    queries: Array,
    bank: Array,
    k: int,
    *,
    block_size: int = BLOCK_SIZE,
    query_block: int = QUERY_BLOCK,
    center: Array | None = None,
    bank_sq_norms: Array | None = None,
    exclude: Array | None = None,
) -> tuple[Array, Array]:
    """Exact k nearest neighbours under squared Euclidean distance, blocked over bank and queries.

    Args:
      queries: (M, D) float32/bfloat16 query features.
      bank: (N, D) float32/bfloat16 bank features.
      k: number of neighbours, 1 <= k <= N (static under jit).
      block_size: bank rows per block; working memory is O(query_block * block_size), not O(M * N).
      query_block: query rows per block.
      center: optional (D,) centre subtracted from queries and bank before the distance expansion (default
        :func:`bank_center`, the bank mean). It leaves distances unchanged up to rounding and keeps float32
        precise when the features share a large offset.
      bank_sq_norms: optional precomputed ``squared_norms(bank, center)`` (N,), to reuse across calls; it
        must be computed with the same centre (both default to the bank mean).
      exclude: optional (M,) integer bank row (array or sequence) that query i must not take as a neighbour
        (-1 = none); this is how leave-one-out scoring excludes a point by index, not by distance.

    Returns:
      (sq_dists, indices), both (M, k), ascending by distance; sq_dists float32 (squared feature units),
      indices int32 into the bank. Ties keep the lower bank index first.

    Raises:
      DN2Error: bad shapes, k, block sizes or exclude values, or (for concrete inputs) NaN/Inf or values so
        large that squared distances overflow float32 (see :func:`max_feature_magnitude`). Inside a jit
        trace only shapes and dtypes can be checked.
    """
    queries = check_features(queries, "queries")
    bank = check_features(bank, "bank")
    _check_same_dim(queries, bank)
    k = check_k(k, bank.shape[0], "the bank size N")
    block_size = check_positive_int(block_size, "block_size")
    query_block = check_positive_int(query_block, "query_block")
    exclude = check_exclude(exclude, queries.shape[0], bank.shape[0])
    if center is None:
        center = bank_center(bank)
    elif tuple(np.shape(center)) != (bank.shape[1],):
        raise DN2Error(f"center must have shape ({bank.shape[1]},), got {tuple(np.shape(center))}")
    center = jnp.asarray(center, jnp.float32)
    if bank_sq_norms is None:
        bank_sq_norms = squared_norms(bank, center)
    elif tuple(bank_sq_norms.shape) != (bank.shape[0],):
        raise DN2Error(f"bank_sq_norms must have shape ({bank.shape[0]},), got {tuple(bank_sq_norms.shape)}")
    return blocked_knn(
        queries,
        bank,
        jnp.asarray(bank_sq_norms, jnp.float32),
        center,
        exclude,
        k=k,
        block_size=max(block_size, k),
        query_block=query_block,
    )


def knn_chunks(
    queries: Array, chunks: Iterable[tuple[int, Array]], k: int, *, center: Array | None = None, **knn_kwargs
) -> tuple[Array, Array]:
    """Exact kNN against a bank streamed in chunks that need not fit in device memory together.

    Args:
      queries: (M, D) query features.
      chunks: iterable of ``(start_row, chunk)`` with chunk (n_i, D); together they form the bank.
      k: neighbours; must not exceed the total bank size.
      center: optional (D,) centre used for every chunk (see :func:`knn`); default: the mean of the first
        chunk (a stream can be read only once), which removes a shared offset as well as the bank mean.
      **knn_kwargs: passed to :func:`knn` for each chunk (block sizes).

    Returns:
      (sq_dists, indices) (M, k) as :func:`knn`, indices into the whole streamed bank.
    """
    queries = check_features(queries, "queries")
    check_k(k, np.iinfo(np.int32).max, "the bank size")
    best = None
    total = 0
    for start, chunk in chunks:
        chunk = jnp.asarray(chunk)
        if center is None:
            center = bank_center(check_features(chunk, "bank"))
        total += chunk.shape[0]
        kc = min(k, chunk.shape[0])
        d, i = knn(queries, chunk, kc, center=center, **knn_kwargs)
        i = i + jnp.int32(start)
        if kc < k:  # pad so every partial result has k columns
            pad = ((0, 0), (0, k - kc))
            d, i = jnp.pad(d, pad, constant_values=jnp.inf), jnp.pad(i, pad, constant_values=-1)
        best = (d, i) if best is None else _merge_topk(*best, d, i, k)
        del chunk  # drop our reference before the iterable loads the next chunk (peak: ~2 chunks, not 3)
    if best is None:
        raise DN2Error("bank is empty (no chunks)")
    check_k(k, total, "the bank size N")
    return best


def knn_score(queries: Array, bank: Array, k: int = 2, **knn_kwargs) -> Array:
    """DN2 anomaly score (paper eq. 2): (M,) mean squared distance to the k nearest bank features.

    Larger is more anomalous. Units: squared feature units.
    """
    sq_dists, _ = knn(queries, bank, k, **knn_kwargs)
    return jnp.mean(sq_dists, axis=1)


def self_knn_score(bank: Array, k: int = 2, **knn_kwargs) -> Array:
    """(N,) leave-one-out DN2 score of every bank point against all *other* bank points.

    The point itself is excluded by index, so exact duplicates still count as each other's neighbours
    (their distance is 0). Requires 1 <= k <= N - 1.
    """
    bank = check_features(bank, "bank")
    k = check_k(k, bank.shape[0] - 1, "the bank size minus one (leave-one-out)")
    n = bank.shape[0]
    sq_dists, _ = knn(bank, bank, k, exclude=jnp.arange(n, dtype=jnp.int32), **knn_kwargs)
    return jnp.mean(sq_dists, axis=1)


def clean(bank: Array, k: int = 2, fraction: float = 0.5, **knn_kwargs) -> Array:
    """Unsupervised cleaning stage: drops the ``fraction`` of bank points with the largest self-kNN score.

    Args:
      bank: (N, D) features of a training set that may contain anomalies.
      k: neighbours for the leave-one-out score.
      fraction: share of points to drop, in (0, 1); ``floor(fraction * N)`` points are dropped.

    Returns:
      (N - floor(fraction * N),) int32 indices of the kept points, sorted ascending.
    """
    fraction = check_fraction(fraction, "fraction")
    return keep_lowest(self_knn_score(bank, k, **knn_kwargs), fraction)


def keep_lowest(scores: Array, fraction: float) -> Array:
    """Indices (sorted, int32) of the ``N - floor(fraction * N)`` lowest of (N,) ``scores``; ties keep the
    lower index. The selection step of :func:`clean`, for scores computed elsewhere (e.g. a sharded bank)."""
    fraction = check_fraction(fraction, "fraction")
    n = scores.shape[0]
    n_keep = n - int(np.floor(fraction * n))
    order = jnp.argsort(scores, stable=True)  # ties: lower index kept first
    return jnp.sort(order[:n_keep]).astype(jnp.int32)


def threshold(bank: Array, k: int = 2, fpr: float = 0.05, **knn_kwargs) -> Array:
    """Decision threshold at a target false-positive rate, from leave-one-out training scores.

    The threshold is the ``1 - fpr`` quantile (the next higher observed value) of :func:`self_knn_score`,
    so at most a share ``fpr`` of the training points scores strictly above it. A query is anomalous when
    ``knn_score(query, bank, k) > threshold``. Returns a float32 scalar in squared feature units.
    """
    fpr = check_fraction(fpr, "fpr")
    return fpr_quantile(self_knn_score(bank, k, **knn_kwargs), fpr)


def fpr_quantile(scores: Array, fpr: float) -> Array:
    """The ``1 - fpr`` quantile (next higher observed value) of (N,) leave-one-out ``scores``: the step of
    :func:`threshold` for scores computed elsewhere. Float32 scalar, in the units of the scores."""
    fpr = check_fraction(fpr, "fpr")
    return jnp.quantile(jnp.asarray(scores), 1.0 - fpr, method="higher")


def l2_normalize(features: Array) -> Array:
    """(N, D) -> (N, D) float32 rows scaled to unit L2 norm (all-zero rows stay zero). Applied to bank and
    queries alike before kNN, it makes the squared distance ``2 - 2 cos``: DN2 on cosine similarity."""
    x = jnp.asarray(features, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pool_groups(features: Array, mask: Array | None = None) -> Array:
    """Orderless mean pooling of sets (paper 3.3): (G, M, D) -> (G, D) float32.

    Args:
      features: (G, M, D) per-image features of G sets of up to M images.
      mask: optional (G, M) bool, True where an image is present (ragged sets padded to M); every set
        needs at least one image.
    """
    features = check_features(features, "features", rank=3)
    x = features.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x, axis=1)
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise DN2Error(f"mask must have shape {tuple(features.shape[:2])} (G, M), got {tuple(mask.shape)}")
    counts = jnp.sum(mask, axis=1)
    if not is_traced(counts) and bool(jnp.any(counts == 0)):
        raise DN2Error(f"mask leaves set(s) {np.flatnonzero(np.asarray(counts) == 0)[:5].tolist()} empty")
    w = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x * w, axis=1) / counts.astype(jnp.float32)[:, None]


def pool_groups_by_id(features: Array, group_ids: Array, num_groups: int) -> Array:
    """Mean pooling of ragged sets given as a flat list: (N, D) features + (N,) set ids -> (G, D) float32.

    ``group_ids[i]`` in ``[0, num_groups)`` names the set of image i; every set needs at least one image.
    """
    features = check_features(features, "features")
    group_ids = jnp.asarray(group_ids)
    if group_ids.ndim != 1 or group_ids.shape[0] != features.shape[0]:
        raise DN2Error(
            f"group_ids must have shape ({features.shape[0]},) to match features, "
            f"got {tuple(group_ids.shape)}"
        )
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise DN2Error(f"group_ids must be integers, got dtype {group_ids.dtype}")
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise DN2Error(f"num_groups must be a positive integer, got {num_groups!r}")
    counts = jax.ops.segment_sum(jnp.ones_like(group_ids, jnp.float32), group_ids, num_segments=num_groups)
    if not is_traced(group_ids):
        ids = np.asarray(group_ids)
        if ids.min() < 0 or ids.max() >= num_groups:
            raise DN2Error(f"group_ids must lie in [0, {num_groups}), got range [{ids.min()}, {ids.max()}]")
        empty = np.flatnonzero(np.asarray(counts) == 0)
        if empty.size:
            raise DN2Error(f"set(s) {empty[:5].tolist()} have no images")
    sums = jax.ops.segment_sum(features.astype(jnp.float32), group_ids, num_segments=num_groups)
    return sums / counts[:, None]
