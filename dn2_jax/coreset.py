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

#: Rows gathered per pruned step (as a fraction of the bank, at least this many rows); above it, a full pass.
PRUNED_BLOCK = 4096
#: Relative safety margin on the triangle-inequality test, so float rounding never prunes a row that updates.
_MARGIN = 1e-3


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
# JAX.


def _sqdist(rows: Array, c: Array) -> Array:
    diff = rows - c
    return jnp.sum(diff * diff, axis=-1)


def _dot_sqdist(rows: Array, rows_sq: Array, c: Array, c_sq: Array) -> Array:
    """``||x||^2 - 2 x.c + ||c||^2`` from precomputed squared norms: one matrix-vector product, one pass over the
    rows (the difference form reads them twice as slowly on XLA:CPU); the same formula as the NumPy reference."""
    return jnp.maximum(rows_sq - 2.0 * jnp.dot(rows, c, precision=lax.Precision.HIGHEST) + c_sq, 0.0)


def _bucket(n: int, floor: int = 64) -> int:
    """``n`` rounded up to one of 8 steps per power of two (at most 12.5% more), so few shapes compile."""
    if n <= floor:
        return floor
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("k_max", "cap"))
def _greedy(x: Array, n: Array, start: Array, k: Array, *, k_max: int, cap: int) -> tuple[Array, Array]:
    """Rows ``>= n`` of ``x`` are padding (never selected); selects ``k <= k_max`` rows (the rest of the
    (k_max,) result is 0). Also returns the number of steps that took the pruned path."""
    rows = x.shape[0]
    valid = jnp.arange(rows) < n
    sq = jnp.einsum("ij,ij->i", x, x, precision=lax.Precision.HIGHEST)
    c0 = x[start]
    min_d = jnp.where(valid, _dot_sqdist(x, sq, c0, sq[start]), -jnp.inf)
    assign = jnp.zeros((rows,), jnp.int32)
    centres = jnp.zeros((k_max, x.shape[1]), x.dtype).at[0].set(c0)
    sel = jnp.zeros((k_max,), jnp.int32).at[0].set(start)

    def full(args):
        min_d, assign, c, c_sq, i, _ = args
        d = _dot_sqdist(x, sq, c, c_sq)
        closer = d < min_d
        return jnp.where(closer, d, min_d), jnp.where(closer, i, assign)

    def pruned(args):
        min_d, assign, c, c_sq, i, need = args
        (idx,) = jnp.nonzero(need, size=cap, fill_value=rows)  # rows: out of bounds, dropped on scatter
        block = x.at[idx].get(mode="fill", fill_value=0)
        old = min_d.at[idx].get(mode="fill", fill_value=0.0)
        d = _dot_sqdist(block, sq.at[idx].get(mode="fill", fill_value=0.0), c, c_sq)
        closer = (d < old) & (idx < rows)
        min_d = min_d.at[idx].set(jnp.where(closer, d, old), mode="drop")
        assign = assign.at[idx].set(jnp.where(closer, i, assign.at[idx].get(mode="fill", fill_value=0)),
                                    mode="drop")
        return min_d, assign

    def step(i, state):
        min_d, assign, centres, sel, pruned_steps = state
        j = jnp.argmax(min_d).astype(jnp.int32)
        c = x[j]
        # A row can only move to c if ||c_a - c|| < 2 r, i.e. ||c_a - c||^2 < 4 min_d (squared, with a margin).
        cc = _sqdist(centres, c)  # the difference form here: the bound needs small distances exact (K x D only)
        need = cc[assign] < 4.0 * min_d * (1.0 + _MARGIN) + 1e-12
        few = jnp.sum(need) <= cap
        min_d, assign = lax.cond(few, pruned, full, (min_d, assign, c, sq[j], i, need))
        return min_d, assign, centres.at[i].set(c), sel.at[i].set(j), pruned_steps + few

    _, _, _, sel, pruned_steps = lax.fori_loop(1, k, step, (min_d, assign, centres, sel, jnp.int32(0)))
    return sel, pruned_steps


@jax.jit
def _project(x: Array, proj: Array) -> Array:
    return jnp.dot(x.astype(jnp.float32), proj, precision=lax.Precision.HIGHEST)


def coreset_select(features: Array | np.ndarray, fraction: float, *, seed: int = 0,
                   proj_dim: int | None = None, pruned_block: int = PRUNED_BLOCK, max_steps: int | None = None,
                   stats: dict | None = None) -> np.ndarray:
    """Greedy k-center coreset of (N, D) ``features``: int64 row indices (K,), K = ``coreset_size(N, fraction)``,
    in selection order, the first one a seeded random row.

    Args:
      features: (N, D) float features (device or host array); the bank must fit in device memory.
      fraction: kept fraction in (0, 1] (PatchCore uses 0.01-0.1).
      seed: seeds the start row and the projection.
      proj_dim: compute distances on a seeded random projection to this many dims (None or >= D: none).
      pruned_block: rows a pruned step gathers at most before falling back to a full pass.
      max_steps: stop after this many selected rows (for timing, as in :func:`coreset_select_numpy`).
      stats: if a dict, receives ``steps`` and ``pruned_steps`` (steps that computed distances only for the
        rows the triangle inequality could not rule out, instead of a full pass over the bank).
    Working memory besides the bank: O(N + K * D); nothing quadratic. N and K are rounded up to one of 8
    sizes per power of two (the bank padded), so few shapes compile.
    """
    n, dim = _check_bank(features)
    k = coreset_size(n, _check_fraction(fraction))
    if max_steps is not None:
        k = min(k, max_steps)
    x = jnp.asarray(features, jnp.float32)
    proj = _projection_for(dim, proj_dim, seed)
    if proj is not None:
        x = _project(x, jnp.asarray(proj))
    rows = _bucket(n)
    if rows > n:
        x = jnp.pad(x, ((0, rows - n), (0, 0)))
    cap = int(min(rows, max(1, pruned_block)))
    sel, pruned_steps = _greedy(x, jnp.int32(n), jnp.int32(_start_index(n, seed)), jnp.int32(k),
                                k_max=_bucket(k, 16), cap=cap)
    if stats is not None:
        stats.update(steps=k - 1, pruned_steps=int(pruned_steps))
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
