"""Scale: exact kNN against a bank sharded over devices and hosts, and opt-in approximate kNN (TPU-KNN).

The bank is split row-wise over a 1-D device mesh (axis ``'data'`` by default). Every device scans its
own rows with the blocked kernel of :mod:`dn2_jax.knn` for every query (queries are replicated), keeps
its k best candidates, and the ``k x devices`` candidates are all-gathered and merged into the global
top-k. Only ``(M, k)`` candidates cross the interconnect, never bank rows, so a bank too large for one
device lives spread over all of them, on one host or many.

Padding: the row count is padded to a multiple of the device count (per process, in multi-host runs).
Padded rows have a squared norm of +inf, so their distance is +inf, and a global row id of -1; as
``k <= N`` there are always at least k real candidates, so a padded row is never returned.

Centering: :func:`shard_bank` computes the global mean of the real rows once (a cross-device reduction)
and every shard centres queries and rows on it, as :func:`dn2_jax.knn.knn` does on one device.

A :class:`ShardedBank` is a registered pytree (arrays as leaves, size/mesh/axis static), so it can be
passed to jitted functions; inside a trace, value checks of queries and ``exclude`` are skipped.

Multi-host: call :func:`initialize_distributed` (or :func:`dn2_jax.distributed.initialize`, which the ``dn2``
commands call from their process flags) first in every process, then :func:`shard_bank` with the rows *this
process* holds (e.g. the embeddings of its :func:`dn2_jax.distributed.share` of the dataset). Global row ids
follow process order: process 0's rows, then process 1's, and so on. Every process calls :func:`sharded_knn`
with the same queries and gets the same replicated result.

Leave-one-out (the unsupervised cleaning stage and thresholds at ImageNet scale):
:func:`sharded_self_knn_score` scores every bank row against all other rows, streaming the bank's own rows
as queries in chunks of ``query_chunk`` rows (each chunk is replicated, the bank never is);
:func:`sharded_clean` and :func:`sharded_threshold` build on it as :func:`dn2_jax.knn.clean` and
:func:`dn2_jax.knn.threshold` do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dn2_jax.errors import DN2Error
from dn2_jax.knn import (
    BLOCK_SIZE,
    QUERY_BLOCK,
    balanced_block,
    block_starts,
    blocked_knn,
    check_exclude,
    check_features,
    check_fraction,
    check_k,
    check_positive_int,
    fpr_quantile,
    is_traced,
    keep_lowest,
    snap_center,
)

Array = jax.Array

DATA_AXIS = "data"


# --------------------------------------------------------------------------------------------------------
# Processes, meshes and sharded banks.


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Joins this process to a multi-host JAX job; call it once, before any other JAX call.

    Args:
      coordinator: ``"host:port"`` of process 0 (reachable from all processes). ``None`` everywhere on
        Cloud TPU, Slurm and Open MPI, where JAX detects all three values itself.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restricts this process to some local accelerators (e.g. one process per GPU).
      timeout_s: seconds to wait for all processes to join.

    On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``), set here.
    """
    missing = [v is None for v in (coordinator, num_processes, process_id)]
    if any(missing) and not all(missing):
        raise DN2Error(
            "coordinator, num_processes and process_id must be given together (or all omitted for "
            "automatic detection on Cloud TPU / Slurm / Open MPI)"
        )
    if num_processes is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DN2Error(f"process_id must lie in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def data_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), ordered process by process."""
    if devices is None:
        devices = jax.devices()
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if not devices:
        raise DN2Error("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (axis,))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["rows", "sq_norms", "row_ids", "center"],
    meta_fields=["size", "mesh", "axis"],
)
@dataclasses.dataclass(frozen=True)
class ShardedBank:
    """A bank placed row-wise over a 1-D mesh, padded to a multiple of the device count; a pytree.

    Attributes:
      rows: (N_pad, D) features, sharded over ``axis``.
      sq_norms: (N_pad,) float32 squared norms of ``rows - center``, +inf on padded rows.
      row_ids: (N_pad,) int32 global row id of every row, -1 on padded rows.
      center: (D,) float32 mean of the real rows (replicated), the centre of every distance computation.
      size: N, the number of real rows (over all processes). Static (pytree metadata), as are mesh and axis.
      mesh, axis: where it lives.
    """

    rows: Array
    sq_norms: Array
    row_ids: Array
    center: Array
    size: int
    mesh: Mesh
    axis: str

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])


@functools.partial(jax.jit, static_argnames=("size", "out_sharding", "replicated"))
def _center_and_norms(rows, row_ids, *, size, out_sharding, replicated):
    """Centre of the real rows (as :func:`dn2_jax.knn.bank_center`: float32 mean plus residual mean, snapped)
    and squared norms of the centred rows, +inf on padded rows. XLA turns the sums over the sharded rows
    into cross-device reductions (psums)."""
    real = (row_ids >= 0)[:, None]
    x = rows.astype(jnp.float32)
    m0 = jnp.sum(jnp.where(real, x, 0.0), axis=0) / size
    r = jnp.where(real, x - m0, 0.0)
    center = snap_center(m0 + jnp.sum(r, axis=0) / size, jnp.sum(jnp.abs(r), axis=0) / size)
    sq = jnp.sum(jnp.square(x - center), axis=1)
    sq = jax.lax.with_sharding_constraint(jnp.where(row_ids >= 0, sq, jnp.inf), out_sharding)
    return sq, jax.lax.with_sharding_constraint(center, replicated)


def shard_bank(rows, mesh: Mesh | None = None, *, axis: str = DATA_AXIS) -> ShardedBank:
    """Places a bank row-wise over ``mesh`` so that each device holds ``N_pad / devices`` rows.

    Args:
      rows: (n, D) float features held by *this process*: the whole bank in a single-process run; in a
        multi-host run, this process's rows (counts may differ between processes; rows of process p get
        global ids after those of processes 0..p-1). Every process must call this together.
      mesh: a mesh with axis ``axis`` (default :func:`data_mesh`).
      axis: the mesh axis to shard rows over.

    Returns:
      a :class:`ShardedBank`; its arrays are global ``jax.Array`` s spanning all processes.
    """
    mesh = data_mesh(axis=axis) if mesh is None else mesh
    if axis not in mesh.axis_names:
        raise DN2Error(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
    n_proc = jax.process_count()
    on_device = n_proc == 1 and isinstance(rows, jax.Array)  # keep a device-resident bank on device
    local = check_features(rows if on_device else np.asarray(rows), "bank")
    n_local, dim = local.shape
    sharding = NamedSharding(mesh, P(axis))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local_devices == 0:
        raise DN2Error(f"mesh has no device of process {jax.process_index()}")
    if n_proc > 1:
        from jax.experimental import multihost_utils

        meta = np.asarray([n_local, dim], np.int64)
        all_meta = np.asarray(multihost_utils.process_allgather(meta)).reshape(n_proc, 2)
        if (all_meta[:, 1] != dim).any():
            raise DN2Error(f"processes hold banks of different feature dimensions: {all_meta[:, 1].tolist()}")
        counts = all_meta[:, 0]
    else:
        counts = np.asarray([n_local])
    offset = int(counts[: jax.process_index()].sum())
    per_process = -(-int(counts.max()) // local_devices) * local_devices  # same local shape everywhere
    pad = per_process - n_local
    local_ids = np.concatenate([np.arange(offset, offset + n_local), np.full(pad, -1)]).astype(np.int32)
    global_rows = per_process * n_proc
    if on_device:
        rows_g = jax.device_put(jnp.pad(local, ((0, pad), (0, 0))) if pad else local, sharding)
        ids_g = jax.device_put(local_ids, sharding)
    else:
        local_rows = np.concatenate([local, np.zeros((pad, dim), local.dtype)]) if pad else local
        rows_g = jax.make_array_from_process_local_data(sharding, local_rows, (global_rows, dim))
        ids_g = jax.make_array_from_process_local_data(sharding, local_ids, (global_rows,))
    size = int(counts.sum())
    norms, center = _center_and_norms(rows_g, ids_g, size=size, out_sharding=sharding,
                                      replicated=NamedSharding(mesh, P()))
    return ShardedBank(rows_g, norms, ids_g, center, size, mesh, axis)


def _replicated(x, mesh: Mesh) -> Array:
    """Queries as an array replicated over the mesh (every process must pass the same values)."""
    if is_traced(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x  # a global array (e.g. queries sharded over processes): the jitted search reshards it
    if isinstance(x, jax.Array):
        return jax.device_put(x, NamedSharding(mesh, P()))  # stays on device
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x, x.shape)


# --------------------------------------------------------------------------------------------------------
# Kernels.


def _sorted_topk(d: Array, i: Array, k: int) -> tuple[Array, Array]:
    """The k smallest of (rows of) candidate lists, ascending, lower row id first on equal distance."""
    d, i = lax.sort((d, i), dimension=1, num_keys=2)
    return d[:, :k], i[:, :k]


@functools.partial(
    jax.jit, static_argnames=("mesh", "axis", "k", "block_size", "query_block", "recall_target", "n_pad")
)
def _sharded_knn(
    queries, rows, sq_norms, row_ids, center, exclude, *, mesh, axis, k, block_size, query_block, recall_target,
    n_pad,
):
    def local(q, r, sq, ids, c, excl):
        kl = min(k, r.shape[0])  # a shard may hold fewer rows than k; padding makes up the rest
        if excl is not None:
            # Global id -> row of this shard (-1 = not here). A shard's real rows carry consecutive ids
            # (shard_bank pads only after a process's last row), so the row is ``id - ids[0]``.
            pos = excl - ids[0]
            here = (excl >= 0) & (pos >= 0) & (pos < r.shape[0])
            here &= jnp.take(ids, jnp.clip(pos, 0, r.shape[0] - 1)) == excl
            excl = jnp.where(here, pos, -1)
        d, i = blocked_knn(q, r, sq, c, excl, k=kl, block_size=max(block_size, kl), query_block=query_block,
                            recall_target=recall_target, reduction_size=n_pad)
        gid = jnp.take(ids, i)
        d = jnp.where(gid < 0, jnp.inf, d)
        all_d = lax.all_gather(d, axis, axis=1, tiled=True)  # (M, devices * kl)
        all_i = lax.all_gather(gid, axis, axis=1, tiled=True)
        return _sorted_topk(all_d, jnp.where(all_i < 0, jnp.iinfo(jnp.int32).max, all_i), k)

    # check_vma=False: the kernels' scan carries start device-invariant and become device-varying; the
    # outputs are replicated by construction (merged from the all-gathered candidates).
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis), P(), P()), out_specs=(P(), P()),
        check_vma=False,
    )(queries, rows, sq_norms, row_ids, center, exclude)


# --------------------------------------------------------------------------------------------------------
# Public API.


def sharded_knn(
    queries,
    bank,
    k: int,
    *,
    mesh: Mesh | None = None,
    axis: str = DATA_AXIS,
    block_size: int = BLOCK_SIZE,
    query_block: int = QUERY_BLOCK,
    approx_recall: float | None = None,
    exclude=None,
) -> tuple[Array, Array]:
    """Exact (or, opt-in, approximate) kNN with the bank sharded row-wise over a mesh of devices/hosts.

    Args:
      queries: (M, D) query features, the same on every process (they are replicated to all devices).
      bank: a :class:`ShardedBank` from :func:`shard_bank`, or (n, D) rows held by this process, which are
        sharded here (pass a ShardedBank to reuse the placement across calls).
      k: neighbours, 1 <= k <= N (real rows over all processes).
      mesh, axis: used only when ``bank`` is not yet sharded (default :func:`data_mesh`).
      block_size, query_block: per-device blocking, as in :func:`dn2_jax.knn.knn`.
      approx_recall: None for exact search; a recall target in (0, 1) reduces each distance tile with
        ``lax.approx_min_k`` instead, which is approximate on TPU only (exact on CPU and GPU).
      exclude: optional (M,) integer global row id (array or sequence) that query i must not return (-1 =
        none), the same on every process; leave-one-out scoring excludes a point by id, as in
        :func:`dn2_jax.knn.knn`. Ids outside ``[-1, N)``, floats and bools raise :class:`DN2Error`.

    Queries and bank are validated as in :func:`dn2_jax.knn.knn` (NaN/Inf and float32 overflow refused for
    concrete values; inside a jit trace only shapes and dtypes are checked).

    Returns:
      (sq_dists, indices), both (M, k) and replicated on every device: ascending squared distances
      (float32) and int32 global row ids, lower id first on equal distance, as :func:`dn2_jax.knn.knn`.
    """
    if not isinstance(bank, ShardedBank):
        bank = shard_bank(bank, mesh, axis=axis)
    if not isinstance(queries, jax.Array) or (jax.process_count() > 1 and queries.is_fully_addressable):
        queries = np.asarray(queries)  # host values: replicated below (the same on every process)
    queries = check_features(queries, "queries")
    if queries.shape[1] != bank.dim:
        raise DN2Error(f"queries and bank differ in feature dimension: {queries.shape[1]} vs {bank.dim}")
    k = check_k(k, bank.size, "the bank size N")
    block_size = check_positive_int(block_size, "block_size")
    query_block = check_positive_int(query_block, "query_block")
    if approx_recall is not None and not 0.0 < float(approx_recall) < 1.0:
        raise DN2Error(f"approx_recall must be in the open interval (0, 1) or None, got {approx_recall}")
    exclude = check_exclude(exclude, queries.shape[0], bank.size)
    if exclude is not None:
        exclude = _replicated(exclude, bank.mesh)
    return _sharded_knn(
        _replicated(queries, bank.mesh),
        bank.rows,
        bank.sq_norms,
        bank.row_ids,
        bank.center,
        exclude,
        mesh=bank.mesh,
        axis=bank.axis,
        k=k,
        block_size=block_size,
        query_block=query_block,
        recall_target=None if approx_recall is None else float(approx_recall),
        n_pad=int(bank.rows.shape[0]),
    )


def sharded_knn_score(queries, bank, k: int = 2, **kwargs) -> Array:
    """DN2 score (M,) against a sharded bank: mean squared distance to the k nearest rows (replicated)."""
    sq_dists, _ = sharded_knn(queries, bank, k, **kwargs)
    return jnp.mean(sq_dists, axis=1)


#: Bank rows per leave-one-out query chunk (replicated on every device: 64 MB at D = 2048, float32).
QUERY_CHUNK = 8192


@functools.partial(jax.jit, static_argnames=("size", "out_sharding"))
def _take_rows(rows, row_ids, start, *, size, out_sharding):
    take = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=size)
    return jax.lax.with_sharding_constraint((take(rows), take(row_ids)), out_sharding)


def _local_copy(x: Array) -> np.ndarray:
    """This process's full copy of a replicated array (works across processes, unlike np.asarray)."""
    return np.asarray(x.addressable_data(0))


def sharded_self_knn_score(
    bank, k: int = 2, *, mesh: Mesh | None = None, axis: str = DATA_AXIS, query_chunk: int = QUERY_CHUNK,
    **kwargs,
) -> np.ndarray:
    """(N,) leave-one-out DN2 score of every row of a sharded bank against all *other* rows, in global row
    order, on every process (host float32 array, squared feature units). As :func:`dn2_jax.knn.self_knn_score`
    (the row itself is excluded by id, so duplicates still count); requires 1 <= k <= N - 1.

    The bank's rows are scored ``query_chunk`` at a time (each chunk replicated to all devices), so memory per
    device is the bank shard plus one chunk. ``kwargs`` go to :func:`sharded_knn` (block sizes, approx_recall).
    """
    if not isinstance(bank, ShardedBank):
        bank = shard_bank(bank, mesh, axis=axis)
    k = check_k(k, bank.size - 1, "the bank size minus one (leave-one-out)")
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, (int, np.integer)) or query_chunk < 1:
        raise DN2Error(f"query_chunk must be a positive integer, got {query_chunk!r}")
    n_pad = int(bank.rows.shape[0])
    chunk = balanced_block(n_pad, int(query_chunk))
    replicated = NamedSharding(bank.mesh, P())
    scores, row_ids = np.zeros(n_pad, np.float32), np.zeros(n_pad, np.int32)
    for start in block_starts(n_pad, chunk):  # the last chunk is shifted back: a few rows are scored twice
        q, ids = _take_rows(bank.rows, bank.row_ids, jnp.int32(start), size=chunk, out_sharding=replicated)
        d, _ = sharded_knn(q, bank, k, exclude=ids, **kwargs)
        scores[start : start + chunk] = _local_copy(jnp.mean(d, axis=1))
        row_ids[start : start + chunk] = _local_copy(ids)
    return scores[row_ids >= 0]  # ids ascend with position: global row order


def sharded_clean(bank, k: int = 2, fraction: float = 0.5, **kwargs) -> np.ndarray:
    """Cleaning stage on a sharded bank: int32 global ids (sorted) of the rows kept after dropping the
    ``floor(fraction * N)`` with the largest leave-one-out score, as :func:`dn2_jax.knn.clean`."""
    fraction = check_fraction(fraction, "fraction")
    return np.asarray(keep_lowest(jnp.asarray(sharded_self_knn_score(bank, k, **kwargs)), fraction))


def sharded_threshold(bank, k: int = 2, fpr: float = 0.05, **kwargs) -> float:
    """Decision threshold at a target false-positive rate for a sharded bank, as :func:`dn2_jax.knn.threshold`
    (squared feature units)."""
    fpr = check_fraction(fpr, "fpr")
    return float(fpr_quantile(sharded_self_knn_score(bank, k, **kwargs), fpr))


def approx_knn(queries, bank, k: int, *, recall_target: float = 0.95, **kwargs) -> tuple[Array, Array]:
    """TPU-KNN (``lax.approx_min_k``) search; approximate on TPU only, exact elsewhere. See sharded_knn."""
    return sharded_knn(queries, bank, k, approx_recall=recall_target, **kwargs)


def knn_recall(indices: Array, exact_indices: Array) -> float:
    """Share of the exact neighbours (M, k) that an approximate search (M, k) also returned."""
    a, b = np.asarray(indices), np.asarray(exact_indices)
    if a.shape != b.shape:
        raise DN2Error(f"indices shapes differ: {a.shape} vs {b.shape}")
    hits = sum(len(np.intersect1d(x, y)) for x, y in zip(a, b, strict=True))
    return hits / b.size
