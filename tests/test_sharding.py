"""Sharded and multi-host kNN. Multi-device runs happen in subprocesses (4 simulated CPU devices, or 2
processes x 2 devices on loopback) so the rest of the suite keeps its single device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dn2_jax.errors import DN2Error
from dn2_jax.knn import knn, self_knn_score, threshold
from dn2_jax.sharding import (
    ShardedBank,
    data_mesh,
    initialize_distributed,
    knn_recall,
    shard_bank,
    sharded_clean,
    sharded_knn,
    sharded_self_knn_score,
    sharded_threshold,
)

WORKER = Path(__file__).with_name("_sharding_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _sharding_worker import bank_and_queries  # noqa: E402


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(args: list[str], devices: int, timeout: float) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("sharding") / "devices.npz"
    _run(["devices", str(out)], devices=4, timeout=240)
    return dict(np.load(out))


def test_bank_is_spread_over_four_devices(four_devices):
    r = four_devices
    assert r["devices"] == 4 and r["shard_devices"] == 4
    assert r["padded_rows"] == 32  # 29 rows padded to a multiple of 4
    np.testing.assert_array_equal(r["shard_rows"], [8, 8, 8, 8])


@pytest.mark.parametrize("k", [1, 3, 8, 28, 29])
def test_sharded_knn_equals_single_device(four_devices, k):
    r = four_devices
    np.testing.assert_array_equal(r[f"i{k}"], r[f"ref_i{k}"])  # includes ties across shards
    np.testing.assert_allclose(r[f"d{k}"], r[f"ref_d{k}"], rtol=1e-5, atol=1e-5)
    assert (r[f"i{k}"] >= 0).all() and (r[f"i{k}"] < 29).all()  # never a padded row


def test_ties_across_shards_keep_lower_index(four_devices):
    # query 0 sits next to rows 3, 20 and 27 (identical, on shards 0, 2 and 3).
    np.testing.assert_array_equal(four_devices["i3"][0], [3, 20, 27])


def test_sharded_score_and_approx_on_cpu(four_devices):
    r = four_devices
    np.testing.assert_allclose(r["score"], r["ref_score"], rtol=1e-5, atol=1e-5)
    # approx_min_k is exact off TPU: recall 1.0 and the same distances.
    assert knn_recall(r["approx_i"], r["ref_i5"]) == 1.0
    np.testing.assert_array_equal(r["approx_i"], r["ref_i5"])
    np.testing.assert_allclose(r["approx_d"], r["ref_d5"], rtol=1e-5, atol=1e-5)
    assert r["k_too_large_raises"]


@pytest.mark.parametrize("k", [1, 2, 28])
def test_leave_one_out_over_four_devices(four_devices, k):
    r = four_devices
    assert r[f"loo{k}"].shape == (29,)  # real rows only, in global order
    np.testing.assert_allclose(r[f"loo{k}"], r[f"ref_loo{k}"], rtol=1e-5, atol=1e-6)
    if k == 1:  # row 3 has exact duplicates (rows 20, 27) on other shards: its distance is 0, not its own
        assert r["loo1"][3] == 0 and r["loo1"][20] == 0
    np.testing.assert_array_equal(r["clean"], r["ref_clean"])


def test_offset_bank_is_centred_globally_over_four_devices(four_devices):
    r = four_devices
    q, b = r["offset_q"].astype(np.float64), r["offset_b"].astype(np.float64)
    ref = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    want_i = np.argsort(ref, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(r["offset_i"], want_i)
    np.testing.assert_allclose(r["offset_d"], np.take_along_axis(ref, want_i, axis=1), rtol=1e-5, atol=1e-6)


def test_sharded_bank_passes_through_jit_on_four_devices(four_devices):
    r = four_devices
    np.testing.assert_array_equal(r["jit_i3"], r["i3"])
    np.testing.assert_array_equal(r["jit_d3"], r["d3"])


def test_sharded_bank_is_a_pytree():
    bank, queries = bank_and_queries()
    sb = shard_bank(bank, data_mesh())
    leaves, treedef = jax.tree_util.tree_flatten(sb)
    assert len(leaves) == 4  # rows, sq_norms, row_ids, center; size/mesh/axis are static metadata
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.rows is sb.rows and rebuilt.center is sb.center and rebuilt.size == sb.size
    np.testing.assert_allclose(sb.center, np.asarray(bank, np.float64).mean(0), atol=0.5 * np.abs(bank).mean())
    same = jax.jit(lambda b: b)(sb)
    assert isinstance(same, ShardedBank) and same.size == sb.size and same.mesh == sb.mesh
    eager = sharded_knn(queries, sb, 2)
    jitted = jax.jit(lambda q, b: sharded_knn(q, b, 2, exclude=jnp.zeros(len(q), jnp.int32)))(queries, sb)
    excluded = sharded_knn(queries, sb, 2, exclude=np.zeros(len(queries), np.int32))
    np.testing.assert_array_equal(jitted[1], excluded[1])
    assert not np.array_equal(np.asarray(eager[1]), np.asarray(excluded[1]))  # row 0 really was excluded


def test_sharded_input_validation():
    bank, queries = bank_and_queries()
    sb = shard_bank(bank, data_mesh())
    as_list = sharded_knn(queries, sb, 2, exclude=list(range(len(queries))))
    as_array = sharded_knn(queries, sb, 2, exclude=np.arange(len(queries)))
    np.testing.assert_array_equal(as_list[1], as_array[1])
    m = len(queries)
    for bad in (np.full(m, 29), np.full(m, -2), np.full(m, 2**32), np.zeros(m, np.float32), np.zeros(m, bool)):
        with pytest.raises(DN2Error, match="exclude must"):
            sharded_knn(queries, sb, 2, exclude=bad)
    with pytest.raises(DN2Error, match="overflow float32"):
        sharded_knn(queries * np.float32(1e30), sb, 2)
    with pytest.raises(DN2Error, match="bank has values up to"):
        shard_bank(bank * np.float32(1e30))
    with pytest.raises(DN2Error, match="overflow float32"):
        shard_bank(jnp.asarray(bank) * 1e30)


def test_device_resident_bank_on_four_devices(four_devices):
    r = four_devices
    assert r["dev_padded_rows"] == 32
    np.testing.assert_array_equal(r["dev_i3"], r["ref_i3"])
    np.testing.assert_allclose(r["dev_d3"], r["ref_d3"], rtol=1e-5, atol=1e-5)


def test_single_device_path_and_validation():
    bank, queries = bank_and_queries()
    sb = shard_bank(bank, data_mesh())
    assert sb.size == 29 and sb.rows.shape == (29, 6)
    d, i = sharded_knn(queries, sb, 2)
    d0, i0 = knn(queries, bank, 2)
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_allclose(d, d0, rtol=1e-6)
    d_dev, i_dev = sharded_knn(jnp.asarray(queries), shard_bank(jnp.asarray(bank)), 2)
    np.testing.assert_array_equal(i_dev, i0)
    with pytest.raises(DN2Error, match="NaN"):
        shard_bank(jnp.asarray(bank).at[3, 1].set(jnp.nan))
    with pytest.raises(DN2Error, match="feature dimension"):
        sharded_knn(queries[:, :5], sb, 2)
    with pytest.raises(DN2Error, match="approx_recall"):
        sharded_knn(queries, sb, 2, approx_recall=1.5)
    with pytest.raises(DN2Error, match="larger than"):
        sharded_knn(queries, sb, 30)
    with pytest.raises(DN2Error, match="exclude must be"):
        sharded_knn(queries, sb, 2, exclude=np.zeros(3, np.int32))
    with pytest.raises(DN2Error, match="minus one"):
        sharded_self_knn_score(sb, 29)
    with pytest.raises(DN2Error, match="query_chunk"):
        sharded_self_knn_score(sb, 2, query_chunk=0)
    with pytest.raises(DN2Error, match="fraction"):
        sharded_clean(sb, 2, 1.0)
    np.testing.assert_allclose(sharded_threshold(sb, 2, 0.1), float(threshold(bank, 2, 0.1)), rtol=1e-6)
    with pytest.raises(DN2Error, match="no axis"):
        shard_bank(bank, data_mesh(axis="model"))
    with pytest.raises(DN2Error, match="together"):
        initialize_distributed("127.0.0.1:1234")


def test_knn_recall():
    assert knn_recall(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 4]])) == 0.75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Waits for cooperating processes (killing any left on failure) and asserts they all succeeded."""
    errors = []
    try:
        for p in procs:
            errors.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)


def test_two_processes_match_one(tmp_path):
    """2 processes x 2 CPU devices on loopback, each holding only its own rows, score like one process."""
    port = _free_port()
    outs = [tmp_path / f"p{p}.npz" for p in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "hosts", str(outs[p]), str(port), str(p), "2"],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(2)
    ]
    _wait_all(procs, timeout=240)
    bank, queries = bank_and_queries()
    ref_d, ref_i = knn(queries, bank, 3)
    ref_score = np.asarray(knn(queries, bank, 2)[0]).mean(1)
    ref_loo = np.asarray(self_knn_score(bank, 2))
    for out, local_rows in zip(outs, (17, 12), strict=True):
        r = np.load(out)
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
        assert r["local_rows"] == local_rows and r["size"] == 29
        np.testing.assert_array_equal(r["i"], ref_i)
        np.testing.assert_allclose(r["d"], ref_d, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["score"], ref_score, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["loo"], ref_loo, rtol=1e-5, atol=1e-6)  # uneven shares, padded rows
        np.testing.assert_array_equal(r["i_sharded_q"], ref_i[:8])  # queries sharded over processes
        np.testing.assert_allclose(r["d_sharded_q"], ref_d[:8], rtol=1e-5, atol=1e-5)


def test_gpu_check_tiny_mode(tmp_path):
    """scripts/gpu_check.py --tiny runs every timed code path on the CPU and writes its JSON."""
    script = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    args = [
        "--tiny",
        "--out",
        str(tmp_path),
        "--sections",
        "device,matmul,knn,embed",
        "--backbones",
        "efficientnet_lite0",
        "--dtypes",
        "float32",
        "--max-batch",
        "2",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=_env(1), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["errors"] == {} and r["device"]["backend"] == "cpu"
    assert r["matmul"]["f32_highest"]["tflops"] > 0
    paths = {run["path"] for run in r["knn"]["runs"] if run.get("seconds", 0) > 0}
    assert paths == {"knn", "sharded_knn", "sharded_knn_approx0.95"}
    assert all(0 < run["fraction_of_f32_peak"] for run in r["knn"]["runs"])
    assert r["knn"]["approx_recall_vs_exact"] == 1.0  # approx_min_k is exact off TPU
    (run,) = r["embed"]["runs"]
    assert run["backbone"] == "efficientnet_lite0" and run["batch"] == 2 and run["images_per_s"] > 0
