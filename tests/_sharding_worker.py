"""Subprocess helper for tests/test_sharding.py: runs sharded kNN on several simulated CPU devices.

Usage: python _sharding_worker.py devices OUT.npz
       python _sharding_worker.py hosts OUT.npz PORT PROCESS_ID NUM_PROCESSES
       python _sharding_worker.py embed OUT.npz

The device count comes from XLA_FLAGS, which the parent sets. Results are written to OUT.npz; the
parent compares them with a single-device reference.
"""

from __future__ import annotations

import sys

import numpy as np


def bank_and_queries(n: int = 29, m: int = 9, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A bank with exact duplicates (ties across shards) and queries, the same in every process."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(n, d)).astype(np.float32)
    bank[20] = bank[3]  # duplicates on different shards: ties must keep the lower row id first
    bank[27] = bank[3]
    queries = rng.normal(size=(m, d)).astype(np.float32)
    queries[0] = bank[3] + 0.01
    return bank, queries


def run_devices(out: str) -> None:
    import jax

    from dn2_jax.errors import DN2Error
    from dn2_jax.knn import clean, knn, self_knn_score
    from dn2_jax.sharding import (
        approx_knn,
        data_mesh,
        shard_bank,
        sharded_clean,
        sharded_knn,
        sharded_knn_score,
        sharded_self_knn_score,
    )

    bank, queries = bank_and_queries()
    mesh = data_mesh()
    sb = shard_bank(bank, mesh)
    res = {
        "devices": np.int32(jax.device_count()),
        "padded_rows": np.int32(sb.rows.shape[0]),
        "shard_rows": np.asarray([s.data.shape[0] for s in sb.rows.addressable_shards], np.int32),
        "shard_devices": np.int32(len({s.device for s in sb.rows.addressable_shards})),
    }
    for k in (1, 3, 8, 28, 29):  # up to k = N: every shard's padding must stay out
        d0, i0 = knn(queries, bank, k, block_size=4, query_block=4)
        d1, i1 = sharded_knn(queries, sb, k, block_size=4, query_block=4)
        res.update({f"ref_d{k}": d0, f"ref_i{k}": i0, f"d{k}": d1, f"i{k}": i1})
    # A device-resident bank is padded and placed on device (no host round trip).
    sb_dev = shard_bank(jax.numpy.asarray(bank), mesh)
    res["dev_padded_rows"] = np.int32(sb_dev.rows.shape[0])
    res["dev_d3"], res["dev_i3"] = sharded_knn(jax.numpy.asarray(queries), sb_dev, 3)
    # Raw rows are sharded on the fly; bfloat16 banks are promoted per block as in knn.
    res["score"] = sharded_knn_score(queries, bank, 2)
    res["ref_score"] = np.asarray(knn(queries, bank, 2)[0]).mean(1)
    d_a, i_a = approx_knn(queries, sb, 5, recall_target=0.9, block_size=4)
    d5, i5 = knn(queries, bank, 5)
    res.update({"approx_d": d_a, "approx_i": i_a, "ref_d5": d5, "ref_i5": i5})
    # Leave-one-out over the sharded bank (duplicates on other shards still count), chunks of 5 rows.
    for k in (1, 2, 28):
        res[f"loo{k}"] = sharded_self_knn_score(sb, k, query_chunk=5, block_size=4)
        res[f"ref_loo{k}"] = self_knn_score(bank, k)
    res["clean"], res["ref_clean"] = sharded_clean(sb, 2, 0.3), clean(bank, 2, 0.3)
    # A shared offset of 100: the global centre (a cross-device mean) keeps float32 precise on every shard.
    shifted = (bank.astype(np.float64) + 100.0).astype(np.float32)
    q_shifted = (queries.astype(np.float64) + 100.0).astype(np.float32)
    res["offset_d"], res["offset_i"] = sharded_knn(q_shifted, shard_bank(shifted, mesh), 3, block_size=4)
    res["offset_q"], res["offset_b"] = q_shifted, shifted
    # The ShardedBank is a pytree: it passes through jit (shard_map inside the outer jit).
    res["jit_d3"], res["jit_i3"] = jax.jit(lambda q, b: sharded_knn(q, b, 3))(queries, sb)
    try:
        sharded_knn(queries, sb, bank.shape[0] + 1)
        res["k_too_large_raises"] = np.bool_(False)
    except DN2Error:
        res["k_too_large_raises"] = np.bool_(True)
    np.savez(out, **{k: np.asarray(v) for k, v in res.items()})


def run_hosts(out: str, port: int, pid: int, nproc: int) -> None:
    from dn2_jax.sharding import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", nproc, pid, timeout_s=60)
    import jax

    from dn2_jax.sharding import shard_bank, sharded_knn, sharded_knn_score, sharded_self_knn_score

    bank, queries = bank_and_queries()
    bounds = np.linspace(0, bank.shape[0], nproc + 1).astype(int)
    bounds[1] += 3  # uneven shares: 17 and 12 rows for two processes
    local = bank[bounds[pid] : bounds[pid + 1]]  # this process's rows only
    sb = shard_bank(local)
    d, i = sharded_knn(queries, sb, 3, block_size=4, query_block=4)
    score = sharded_knn_score(queries, sb, 2)
    loo = sharded_self_knn_score(sb, 2, query_chunk=6)
    # Queries that are themselves spread over the processes (4 rows each, 2 per device).
    from jax.sharding import NamedSharding, PartitionSpec

    q_sharding = NamedSharding(sb.mesh, PartitionSpec("data"))
    q_global = jax.make_array_from_process_local_data(q_sharding, queries[4 * pid : 4 * pid + 4], (8, 6))
    d_sharded_q, i_sharded_q = sharded_knn(q_global, sb, 3, block_size=4, query_block=4)
    np.savez(
        out,
        processes=np.int32(jax.process_count()),
        devices=np.int32(jax.device_count()),
        local_devices=np.int32(jax.local_device_count()),
        local_rows=np.int32(local.shape[0]),
        size=np.int32(sb.size),
        d=np.asarray(d),
        i=np.asarray(i),
        score=np.asarray(score),
        loo=loo,
        d_sharded_q=np.asarray(d_sharded_q),
        i_sharded_q=np.asarray(i_sharded_q),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "devices":
        run_devices(out_path)
    elif mode == "hosts":
        run_hosts(out_path, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode}")
