"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling), on device, plus a streamed variant.

Greedy k-center (Gonzalez): start from one seeded random row; repeatedly add the row farthest (squared
Euclidean) from everything selected so far. The state is the running min-distance vector (N,) of every bank row
to its nearest selected row; each step is one argmax and one distance pass that updates it.

The distance pass is exact but pruned with the triangle inequality: a row x assigned to selected centre a(x)
(its nearest so far, at distance r(x)) cannot get closer to the new centre c unless ||c_a(x) - c|| < 2 r(x).
Each step therefore computes the (K,) distances from c to the centres, marks the rows that pass that test, and
computes distances only for them (gathered in one fixed-size block; a full pass over the bank when more rows
need it). The selection is the same as the plain greedy's (tested against :func:`coreset_select_numpy`).

Random projection (PatchCore's "approximate greedy coreset"): with ``proj_dim`` the distances are computed on
``features @ random_projection(D, proj_dim, seed)``; the returned indices still refer to the given rows.

Streaming (:func:`coreset_select_stream`): a bank that does not fit in memory is read in chunks (a
``np.memmap``/``.npy`` file is read with ``np.fromfile`` at offsets, so no mapped pages stay resident); each
chunk contributes its own greedy coreset of ``oversample * fraction`` of its rows to a pool, and the final
greedy runs on the pool (composable coresets for k-center). Peak memory: one chunk plus the pool.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dn2_jax.errors import DN2Error

Array = jax.Array

#: Default rows per block of :func:`coreset_select`'s pruning.
BLOCK_ROWS = 1024
#: Dimensions of the PCA projection whose per-row lower bound decides whether a visited block needs exact distances.
BOUND_RANK = 16
#: Relative safety margin on the triangle-inequality test, so float rounding never prunes a row that updates.
_MARGIN = 1e-4


def coreset_size(n: int, fraction: float) -> int:
    """Number of rows a coreset of ``fraction`` of ``n`` rows keeps: ``max(1, floor(fraction * n))``."""
    _check_fraction(fraction)
    return max(1, int(math.floor(fraction * n + 1e-9)))


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise DN2Error(f"coreset fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise DN2Error(f"coreset fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def random_projection(dim_in: int, dim_out: int, seed: int = 0) -> np.ndarray:
    """Seeded Gaussian random projection (dim_in, dim_out) float32, entries N(0, 1/dim_out) (Johnson-Lindenstrauss:
    squared distances are preserved in expectation)."""
    if dim_in < 1 or dim_out < 1:
        raise DN2Error(f"projection dimensions must be positive, got {dim_in} -> {dim_out}")
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def _check_bank(features, name: str = "features") -> tuple[int, int]:
    shape = np.shape(features)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise DN2Error(f"{name} must be a non-empty (N, D) array, got shape {shape}")
    return int(shape[0]), int(shape[1])


def _start_index(n: int, seed: int) -> int:
    return int(np.random.default_rng(seed).integers(n))


def _projection_for(dim: int, proj_dim: int | None, seed: int) -> np.ndarray | None:
    if proj_dim is None or proj_dim >= dim:
        return None
    return random_projection(dim, proj_dim, seed)


# ----------------------------------------------------------------------------------------------------------
# NumPy reference (and the baseline of benchmarks/coreset.py).


def coreset_select_numpy(features: np.ndarray, fraction: float, *, seed: int = 0,
                         proj_dim: int | None = None, max_steps: int | None = None) -> np.ndarray:
    """Plain greedy k-center in NumPy float32: the reference for :func:`coreset_select`.

    Each step is one BLAS matrix-vector product over the bank, ``||x||^2 - 2 x.c + ||c||^2``, a minimum and an
    argmax. ``max_steps`` stops early (for timing). Returns int64 row indices (K,) in selection order.
    """
    n, dim = _check_bank(features)
    k = coreset_size(n, fraction)
    if max_steps is not None:
        k = min(k, max_steps)
    x = np.asarray(features, np.float32)
    proj = _projection_for(dim, proj_dim, seed)
    if proj is not None:
        x = x @ proj
    sq = np.einsum("ij,ij->i", x, x)
    sel = np.empty(k, np.int64)
    sel[0] = _start_index(n, seed)

    def dist(j):
        return np.maximum(sq - 2.0 * (x @ x[j]) + sq[j], 0.0)

    min_d = dist(sel[0])
    for i in range(1, k):
        sel[i] = int(np.argmax(min_d))
        np.minimum(min_d, dist(sel[i]), out=min_d)
    return sel


# ----------------------------------------------------------------------------------------------------------
# JAX: blocked greedy with triangle-inequality pruning.


def _sqdist(rows: Array, c: Array) -> Array:
    diff = rows - c
    return jnp.sum(diff * diff, axis=-1)


def _bucket(n: int, floor: int = 64) -> int:
    """``n`` rounded up to one of 8 steps per power of two (at most 12.5% more), so few shapes compile."""
    if n <= floor:
        return floor
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _layout(n: int, block_rows: int) -> tuple[int, int]:
    """(levels, rows per block): 2**levels blocks of at most ``max(8, block_rows)`` rows, a multiple of 8,
    holding ``n`` rows."""
    levels = max(0, math.ceil(math.log2(max(1.0, n / max(8, block_rows)))))
    rows = -(-n // (1 << levels))
    return levels, -(-rows // 8) * 8


@functools.partial(jax.jit, static_argnames=("levels",))
def _tree_order(x: Array, *, levels: int) -> Array:
    """Permutation (R,) int32 of the rows of ``x`` (R, D), R divisible by 2**levels, into 2**levels equal,
    spatially coherent blocks: each level splits every node at the median of its rows' projections on the
    node's principal direction (power iteration on a strided subsample of the node)."""
    rows, dim = x.shape
    perm = jnp.arange(rows, dtype=jnp.int32)
    v0 = jnp.cos(jnp.arange(1, dim + 1, dtype=jnp.float32) * 0.7) + 0.1  # a fixed, generic start direction
    for level in range(levels):
        nodes = 1 << level
        xs = x[perm].reshape(nodes, rows // nodes, dim)
        mu = jnp.mean(xs, axis=1)
        sub = xs[:, :: max(1, (rows // nodes) // 2048)] - mu[:, None]
        v = jnp.broadcast_to(v0, (nodes, dim))
        for _ in range(6):
            v = jnp.einsum("nmd,nm->nd", sub, jnp.einsum("nmd,nd->nm", sub, v))
            v = v / (jnp.linalg.norm(v, axis=1, keepdims=True) + 1e-30)
        order = jnp.argsort(jnp.einsum("nmd,nd->nm", xs, v), axis=1)
        perm = jnp.take_along_axis(perm.reshape(nodes, -1), order, axis=1).reshape(-1)
    return perm


_NO_ROW = np.iinfo(np.int32).max


def _block_max(m: Array, orig: Array) -> tuple[Array, Array]:
    """Per block (last axis): the max of ``m`` and the smallest original index attaining it (NumPy's argmax
    rule: the first row)."""
    top = jnp.max(m, axis=-1)
    return top, jnp.min(jnp.where(m == top[..., None], orig, _NO_ROW), axis=-1)


def _low_dim(x: Array, mean: Array, basis: Array) -> tuple[Array, Array, Array]:
    """Rows' coordinates (..., r) on the orthonormal ``basis`` (D, r) around ``mean``, residual norms (...) and
    centred squared norms (...): ||x - c||^2 >= ||y_x - y_c||^2 + (e_x - e_c)^2 for any x, c."""
    xc = x - mean
    y = jnp.dot(xc, basis, precision=lax.Precision.HIGHEST)
    res = xc - jnp.dot(y, basis.T, precision=lax.Precision.HIGHEST)
    return y, jnp.sqrt(jnp.sum(res * res, axis=-1)), jnp.sum(xc * xc, axis=-1)


def _safe_lower(y: Array, e: Array, q: Array, yc: Array, ec: Array, qc: Array) -> Array:
    """A lower bound on the squared distance, lowered by a float32-rounding margin (never above the true one)."""
    diff = y - yc
    lb = jnp.sum(diff * diff, axis=-1) + (e - ec) ** 2
    return lb * (1.0 - 1e-3) - 1e-5 * (q + qc)


@functools.partial(jax.jit, static_argnames=("k_max", "rank"))
def _greedy_blocked(xb: Array, orig: Array, n: Array, c0: Array, start: Array, k: Array, *, k_max: int,
                    rank: int) -> tuple[Array, Array, Array]:
    """Exact greedy k-center on a bank laid out as blocks ``xb`` (B, S, D) with original row indices ``orig``
    (B, S) (rows with index >= n are padding: never selected). Returns the original indices (k_max,) in
    selection order (the first ``k``; the rest 0), the number of blocks that passed the block test and the
    number whose exact distances were computed (B each for the first pass).

    State: the min-distance ``m`` (B, S) of each row to the selected rows and, per block, its max and the first
    row attaining it, plus the fixed centroid ``mu`` and radius ``R`` of each block. A new centre c lowers m(x)
    only if ||x - c|| < sqrt(m(x)), so by the triangle inequality no row of block b can change if
    ||mu_b - c|| - R_b >= sqrt(max_b m): each step visits only the other blocks (compacted, one slice each). A
    visited block first checks a per-row lower bound from a ``rank``-dim PCA projection plus the residual norm
    (``_low_dim``), and computes its exact distances only if some row passes it."""
    n_blocks, rows, dim = xb.shape
    m = jnp.where(orig < n, _sqdist(xb, c0), -jnp.inf)
    top, first = _block_max(m, orig)
    mu = jnp.mean(xb, axis=1)
    radius = jnp.sqrt(jnp.max(_sqdist(xb, mu[:, None]), axis=1))
    sample = xb.reshape(-1, dim)[:: max(1, n_blocks * rows // 8192)]
    mean = jnp.mean(sample, axis=0)
    cov = jnp.dot((sample - mean).T, sample - mean, precision=lax.Precision.HIGHEST)
    basis = jnp.linalg.eigh(cov)[1][:, ::-1][:, :rank]
    yb, eb, qb = _low_dim(xb, mean, basis)
    sel = jnp.zeros((k_max,), jnp.int32).at[0].set(start)

    def exact(carry):
        t, count, todo, c, m, top, first = carry
        b = todo[t]
        mb = jnp.minimum(m[b], _sqdist(xb[b], c))
        tb, fb = _block_max(mb, orig[b])
        return t + 1, count, todo, c, m.at[b].set(mb), top.at[b].set(tb), first.at[b].set(fb)

    def step(i, state):
        m, top, first, sel, visits, exacts = state
        key = jnp.where(top == jnp.max(top), first, _NO_ROW)
        b = jnp.argmin(key)
        j = key[b]
        c = xb[b, jnp.argmax(orig[b] == j)]
        dc = jnp.sqrt(_sqdist(mu, c))
        # Float safety: a relative margin on both sides of the test (never skips a block that could change).
        lower = dc * (1.0 - _MARGIN) - radius * (1.0 + _MARGIN)
        need = lower < jnp.sqrt(jnp.maximum(top, 0.0)) * (1.0 + _MARGIN) + 1e-12
        count = jnp.sum(need, dtype=jnp.int32)

        def some(args):  # the blocks that need it: per-row bound, then exact distances where some row passes
            m, top, first = args
            (todo,) = jnp.nonzero(need, size=n_blocks, fill_value=0)
            yc, ec, qc = _low_dim(c, mean, basis)

            def check(carry):
                t, flags = carry
                b = todo[t]
                return t + 1, flags.at[t].set(jnp.any(_safe_lower(yb[b], eb[b], qb[b], yc, ec, qc) < m[b]))

            _, flags = lax.while_loop(lambda s: s[0] < count, check,
                                      (jnp.int32(0), jnp.zeros((n_blocks,), bool)))
            done = jnp.sum(flags, dtype=jnp.int32)
            todo = todo[jnp.nonzero(flags, size=n_blocks, fill_value=0)[0]]
            out = lax.while_loop(lambda s: s[0] < s[1], exact, (jnp.int32(0), done, todo, c, m, top, first))
            return (*out[4:], done)

        def every(args):  # most blocks: one fused pass over the bank is cheaper than a loop of slices
            m, _, _ = args
            m = jnp.minimum(m, _sqdist(xb, c))
            return (m, *_block_max(m, orig), count)

        m, top, first, done = lax.cond(count * 2 > n_blocks, every, some, (m, top, first))
        return m, top, first, sel.at[i].set(j), visits + count, exacts + done

    _, _, _, sel, visits, exacts = lax.fori_loop(
        1, k, step, (m, top, first, sel, jnp.int32(n_blocks), jnp.int32(n_blocks)))
    return sel, visits, exacts


@jax.jit
def _project(x: Array, proj: Array) -> Array:
    return jnp.dot(x.astype(jnp.float32), proj, precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("rows", "levels"))
def _arrange(x: Array, *, rows: int, levels: int) -> tuple[Array, Array]:
    """The bank padded to ``rows`` (with copies of its own rows) and permuted into 2**levels blocks:
    (B, S, D) rows and (B, S) int32 original indices (>= N for the padding)."""
    n = x.shape[0]
    if rows > n:
        x = jnp.concatenate([x, x[jnp.arange(rows - n) % n]])
    perm = _tree_order(x, levels=levels)
    blocks = 1 << levels
    return x[perm].reshape(blocks, rows // blocks, x.shape[1]), perm.reshape(blocks, -1)


def coreset_select(features: Array | np.ndarray, fraction: float, *, seed: int = 0,
                   proj_dim: int | None = None, block_rows: int = BLOCK_ROWS,
                   stats: dict | None = None) -> np.ndarray:
    """Greedy k-center coreset of (N, D) ``features``: int64 row indices (K,), K = ``coreset_size(N, fraction)``,
    in selection order, the first one a seeded random row; the same selection as :func:`coreset_select_numpy`.

    Args:
      features: (N, D) float features (device or host array); the bank must fit in device memory.
      fraction: kept fraction in (0, 1] (PatchCore uses 0.01-0.1).
      seed: seeds the start row and the projection.
      proj_dim: compute distances on a seeded random projection to this many dims (None or >= D: none).
      block_rows: rows per block of the pruning (at most; blocks are a power of two in number).
      stats: if a dict, receives ``blocks``, ``block_rows`` and ``block_visits`` (blocks whose distances were
        computed, summed over all steps; the unpruned cost is ``blocks * K``).
    Working memory besides the bank: one permuted copy of the bank (padded by at most ~13%), O(N + K) more;
    nothing quadratic. N and K are rounded up to one of 8 sizes per power of two, so few shapes compile.
    """
    n, dim = _check_bank(features)
    k = coreset_size(n, _check_fraction(fraction))
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise DN2Error(f"block_rows must be a positive integer, got {block_rows!r}")
    start = _start_index(n, seed)
    x = jnp.asarray(features, jnp.float32)
    proj = _projection_for(dim, proj_dim, seed)
    if proj is not None:
        x = _project(x, jnp.asarray(proj))
    levels, per_block = _layout(_bucket(n), int(block_rows))
    c0 = x[start]
    xb, orig = _arrange(x, rows=per_block << levels, levels=levels)
    del x
    sel, visits, exacts = _greedy_blocked(xb, orig, jnp.int32(n), c0, jnp.int32(start), jnp.int32(k),
                                          k_max=_bucket(k, 16), rank=min(dim, BOUND_RANK))
    if stats is not None:
        stats.update(blocks=1 << levels, block_rows=per_block, block_visits=int(visits), exact_visits=int(exacts))
    return np.asarray(sel[:k], np.int64)


# ----------------------------------------------------------------------------------------------------------
# Streaming.


def iter_row_chunks(source, chunk_rows: int = 65536) -> Iterator[np.ndarray]:
    """(n_i, D) float32 chunks of a bank: an (N, D) array, a ``np.memmap``, a ``.npy`` path, or an iterable of
    (n_i, D) chunks (passed through). Files are read with ``np.fromfile`` at an offset per chunk, so RSS holds
    one chunk, not the mapped file."""
    if chunk_rows < 1:
        raise DN2Error(f"chunk_rows must be positive, got {chunk_rows}")
    if isinstance(source, (str, os.PathLike)):
        source = np.load(source, mmap_mode="r")
    if isinstance(source, np.memmap) and source.ndim == 2 and source.flags.c_contiguous and source.filename:
        n, dim = _check_bank(source, "bank")
        offset, dtype, path = source.offset, source.dtype, source.filename
        del source
        for s in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - s)
            chunk = np.fromfile(path, dtype=dtype, count=rows * dim, offset=offset + s * dim * dtype.itemsize)
            yield chunk.reshape(rows, dim).astype(np.float32, copy=False)
        return
    if isinstance(source, np.ndarray):
        n, _ = _check_bank(source, "bank")
        for s in range(0, n, chunk_rows):
            yield np.asarray(source[s : s + chunk_rows], np.float32)
        return
    for chunk in source:
        yield np.asarray(chunk, np.float32)


def coreset_select_stream(source, fraction: float, *, seed: int = 0, proj_dim: int | None = None,
                          chunk_rows: int = 65536, oversample: float = 4.0) -> np.ndarray:
    """Coreset of a bank too large for memory: int64 row indices (K,) into the whole stream, K =
    ``coreset_size(N, fraction)``.

    ``source`` as in :func:`iter_row_chunks`. Each chunk keeps its greedy coreset of ``min(1, oversample *
    fraction)`` of its rows (distances on the seeded projection if ``proj_dim``); the pool of kept rows then gets
    the final greedy selection. Peak memory: one chunk + the pool (``oversample * fraction * N`` rows). When
    ``oversample * fraction >= 1`` nothing is dropped per chunk and the result equals :func:`coreset_select`'s.
    """
    fraction = _check_fraction(fraction)
    if oversample < 1:
        raise DN2Error(f"oversample must be >= 1, got {oversample}")
    chunk_fraction = min(1.0, oversample * fraction)
    pool, pool_ids, proj, total, chunks = [], [], None, 0, 0
    for chunk in iter_row_chunks(source, chunk_rows):
        n, dim = _check_bank(chunk, "bank chunk")
        if proj is None:
            proj = _projection_for(dim, proj_dim, seed)
            proj = None if proj is None else jnp.asarray(proj)
        x = jnp.asarray(chunk)
        if proj is not None:
            x = _project(x, proj)
        keep = np.arange(n) if chunk_fraction >= 1.0 else coreset_select(x, chunk_fraction, seed=seed + chunks)
        pool.append(np.asarray(x)[keep])
        pool_ids.append(keep + total)
        total += n
        chunks += 1
        del chunk, x
    if total == 0:
        raise DN2Error("bank is empty (no chunks)")
    ids = np.concatenate(pool_ids)
    k = coreset_size(total, fraction)
    pooled = np.concatenate(pool)
    sel = coreset_select(pooled, min(1.0, (k + 0.5) / len(pooled)), seed=seed)
    return ids[sel[:k]]
