"""One `dn2` command over several processes (hosts): jax.distributed set-up, who writes, and the work split.

Every process runs the same command; `initialize` joins them into one JAX job (flags, or the environment
variables `jax.distributed.initialize` reads on clusters), and then:

- each process embeds its `share` of the images: a contiguous slice of the indices, ``np.array_split`` order,
  so process 0 holds the first rows, process 1 the next and so on (the global row order of
  :func:`dn2_jax.sharding.shard_bank` and of multi-part embedding stores);
- features every process needs are all-gathered with `gather_rows` (the queries; a bank is sharded instead);
- only process 0 (`is_writer`) writes results, plots, detectors and reports; `barrier` orders the writes.

With no flags and no cluster environment nothing is initialised and everything is a single-process run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dn2_jax.errors import DN2Error

# Environment variables by which `jax.distributed.initialize()` (no arguments) finds the job on a cluster:
# a coordinator address, Slurm (srun with several tasks), Open MPI (mpirun), Cloud TPU pods (several workers).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _field(help: str) -> Any:
    return dataclasses.field(default=None, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """How this process joins a multi-process job (all None: a single process, or detected on a cluster)."""

    coordinator: str | None = _field("host:port of process 0, reachable from every process (with --num-processes "
                                     "and --process-id; omit all three on Slurm, Open MPI or Cloud TPU, where JAX "
                                     "detects them)")
    num_processes: int | None = _field("processes in the job, each running this same command")
    process_id: int | None = _field("this process's index in [0, num-processes); process 0 writes the outputs")


def cluster_detected(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a multi-process job JAX can join without flags: JAX_COORDINATOR_ADDRESS
    set, or Slurm / Open MPI / Cloud TPU variables naming more than one process."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(name, "").isdigit() and int(env[name]) > 1:
            return name != "SLURM_NTASKS" or "SLURM_PROCID" in env
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(config: ProcessConfig | None = None, *, timeout_s: int = 300) -> bool:
    """Joins this process to the job `config` (or the cluster's, see `cluster_detected`); call it before any
    JAX computation. Returns whether a multi-process job was joined (False: single process, nothing done).

    Raises:
      DN2Error: only some of coordinator / num_processes / process_id given, or process_id out of range.
    """
    import jax

    from dn2_jax.sharding import initialize_distributed

    cfg = config or ProcessConfig()
    given = [getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg)]
    if any(given) and not all(given):
        raise DN2Error("--coordinator, --num-processes and --process-id go together (or none of them, on a cluster "
                       "JAX detects)")
    if not any(given) and not cluster_detected():
        return False
    if jax.distributed.is_initialized():
        return True
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id, timeout_s=timeout_s)
    _connect()
    return True


def _connect() -> None:
    """Opens the cross-process collectives now, while the processes are in step: on CPU (gloo) the first
    collective of a set of devices waits only ~30 s for the others, so the first one after an uneven share of
    work (embedding) would fail; later ones wait as long as it takes."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dn2_jax.sharding import DATA_AXIS, data_mesh

    barrier("dn2-joined")  # process-level collectives (all-gathers, barriers)
    mesh = data_mesh()  # device-level ones (sharded kNN over every device of every process)
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)),
                                                  np.ones(jax.local_device_count(), np.float32))
    jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ones).block_until_ready()


def process_index() -> int:
    """This process's index in the job (0 in a single-process run)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """Processes in the job (1 in a single-process run)."""
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the outputs (results, plots, detectors, reports): process 0."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for in a single process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def share_bounds(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, stop) of process `index`'s share of n items out of `count` processes (default: this process,
    this job): contiguous, sizes differing by at most one (``np.array_split``)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    if not 0 <= index < count:
        raise DN2Error(f"process index {index} is not in [0, {count})")
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def share(indices: Any, index: int | None = None, count: int | None = None) -> np.ndarray:
    """Process `index`'s contiguous share of 1-D `indices` (default: this process's of this job)."""
    indices = np.asarray(indices)
    a, b = share_bounds(len(indices), index, count)
    return indices[a:b]


def gather_rows(local: Any, total: int) -> np.ndarray:
    """The concatenation, in process order, of every process's (n_p, D) `local` rows, where n_p is the size of
    process p's `share` of `total` rows: (total, D) on every process (`local` itself in a single process)."""
    local = np.asarray(local)
    count = process_count()
    if local.ndim != 2 or local.shape[0] != np.diff(share_bounds(total))[0]:
        raise DN2Error(f"gather_rows: this process holds {local.shape} rows, its share of {total} is "
                       f"{np.diff(share_bounds(total))[0]} rows of (n, D)")
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    width = -(-total // count)
    padded = np.zeros((width, local.shape[1]), local.dtype)
    padded[: len(local)] = local
    full = np.asarray(multihost_utils.process_allgather(padded, tiled=False)).reshape(count, width, -1)
    return np.concatenate([full[p, : np.diff(share_bounds(total, p, count))[0]] for p in range(count)])


def embed_shares(embed: Callable[[Any], Any], images: Any) -> np.ndarray:
    """(N, D) features of N `images` on every process, each process embedding only its `share` with `embed`
    (images -> (n, D)); a single process embeds all. `images`: an array or a list (sliced, not copied)."""
    if process_count() == 1:
        return np.asarray(embed(images))
    a, b = share_bounds(len(images))
    if b == a:
        raise DN2Error(f"{len(images)} images cannot be shared by {process_count()} processes; run fewer processes")
    return gather_rows(np.asarray(embed(images[a:b]), np.float32), len(images))
