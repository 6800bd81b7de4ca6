"""`dn2 embed`, `dn2 fit`, `dn2 score` and `dn2 eval` across 2 processes on loopback (jax.distributed, CPU with gloo)
give what one process gives; multi-part stores open as one store and refuse another process count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2_jax import distributed
from dn2_jax.errors import DN2Error
from dn2_jax.store import IncompleteStoreError, open_store

ROOT = Path(__file__).parents[1]
TIMEOUT = 600  # seconds for one step (commands run together); then every process is killed
GRACE = 30  # seconds the other processes of a job get to exit on their own after one of them failed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _dn2(runs: list[tuple[list[str], int]]) -> list[subprocess.CompletedProcess]:
    """Runs `dn2 ARGS` once per (ARGS, processes) entry, all at the same time; a multi-process entry starts that
    many processes on loopback (2 CPU devices each). Returns one result per process (stdout, stderr, returncode);
    kills them all if any outlives TIMEOUT."""
    procs, files = [], []
    for args, n in runs:
        port = _free_port()
        for p in range(n):
            flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(p)]
            files.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))  # no pipe to fill and block
            procs.append(subprocess.Popen([sys.executable, "-m", "dn2_jax.cli", *args, *(flags if n > 1 else [])],
                                          env=_env(2 if n > 1 else 1), stdout=files[-1][0], stderr=files[-1][1],
                                          text=True))
    groups = [procs[sum(n for _, n in runs[:i]):][:n] for i, (_, n) in enumerate(runs)]
    deadline = time.monotonic() + TIMEOUT
    failed_at: dict[int, float] = {}
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for g, group in enumerate(groups):
                # A process that failed may leave the others of its job waiting in a barrier: end them, after a
                # grace period in which a process refusing the same input on its own exits with its own error.
                if any(p.poll() not in (None, 0) for p in group):
                    failed_at.setdefault(g, time.monotonic())
                    if time.monotonic() - failed_at[g] > GRACE:
                        for p in group:
                            if p.poll() is None:
                                p.kill()
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, streams in zip(procs, files, strict=True):
        p.wait(timeout=30)
        out, err = (f.seek(0) or f.read() for f in streams)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _ok(results):
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args[3:])}\n{r.stderr[-3000:]}"
    return results


def _png_folder(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(path / f"im{i:02d}.png")
    return path


@pytest.mark.slow
def test_eval_embed_fit_score_on_two_processes_equal_one(tmp_path):
    small = ["--backbone", "pixels", "--dataset", "fashion_mnist"]
    ev = ["eval", *small, "--classes", "0,7", "--bank-size", "25", "--test-size", "41", "--no-cache"]
    emb = ["embed", *small, "--split", "test", "--class", "3", "--chunk-size", "150"]
    train, test = _png_folder(tmp_path / "train", 31, 0), _png_folder(tmp_path / "test", 9, 1)
    # One job of 2 processes beside one process at a time (this test's machine may have 2 cores).
    results = _ok(_dn2([(ev + ["--out", str(tmp_path / "eval2")], 2), (ev + ["--out", str(tmp_path / "eval1")], 1)]))
    _ok(_dn2([(emb + ["--out", str(tmp_path / "store2")], 2), (emb + ["--out", str(tmp_path / "store1")], 1)]))
    _ok(_dn2([(["fit", "--backbone", "pixels", "--images", str(train), "--out", str(tmp_path / f"det{n}")], n)
              for n in (2, 1)]))
    # Only process 0 prints (and writes); gloo's own connection lines come from every process.
    assert "wrote" in results[0].stdout and "ROC-AUC" in results[0].stdout
    assert "wrote" not in results[1].stdout and "ROC-AUC" not in results[1].stdout

    two, one = (json.loads((tmp_path / f"eval{n}" / "results.json").read_text()) for n in (2, 1))
    assert list(two["per_class"]) == ["T-shirt/top", "Sneaker"]
    for name, auc in one["per_class"].items():
        assert two["per_class"][name] == pytest.approx(auc, abs=1e-6)
    assert (tmp_path / "eval2" / "roc.png").is_file()

    # Each process wrote its part; the parts open as one store equal to the single process's.
    store2, store1 = tmp_path / "store2", tmp_path / "store1"
    assert sorted(p.name for p in store2.iterdir() if not p.name.startswith(".")) == [
        "part-0-of-2", "part-1-of-2", "parts.json"]
    s2, s1 = open_store(store2, verify=True), open_store(store1)
    assert [p.count for p in s2.parts] == [500, 500] and s2.count == s1.count == 1000
    np.testing.assert_array_equal(s2.ids, s1.ids)
    np.testing.assert_array_equal(s2.labels, s1.labels)
    np.testing.assert_allclose(s2.embeddings(), s1.embeddings(), atol=1e-6)
    assert s2.metadata["backbone"] == "pixels" and s2.metadata["process_count"] == 2

    # Scores of the detector fitted and used by 2 processes, and by 1.
    reports = {(n, n): tmp_path / f"scores-{n}.json" for n in (2, 1)}
    _ok(_dn2([(["score", str(tmp_path / f"det{f}"), "--images", str(test), "--out", str(out)], s)
              for (f, s), out in reports.items()]))
    rows = {key: json.loads(out.read_text())["scores"] for key, out in reports.items()}
    ref = rows[(1, 1)]
    for key, got in rows.items():
        assert [r["id"] for r in got] == [r["id"] for r in ref], key
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in ref], atol=1e-6)
        np.testing.assert_allclose([r["p_value"] for r in got], [r["p_value"] for r in ref], atol=1e-6)
        assert [[n["id"] for n in r["neighbours"]] for r in got] == [[n["id"] for n in r["neighbours"]] for r in ref]

    # Resuming with another process count: refused, naming the count that began the store.
    (store2 / "parts.json").unlink()  # as if killed before process 0 committed the parts
    with pytest.raises(IncompleteStoreError, match="2 processes"):
        open_store(store2)
    manifest = json.loads((store1 / "manifest.json").read_text())
    (store1 / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    results = _dn2([(emb + ["--out", str(store2)], 1), (emb + ["--out", str(store1)], 2)])  # 3 processes
    assert [r.returncode for r in results] == [2, 2, 2]
    assert "begun by 2 processes" in results[0].stderr and "resume it with 2 processes" in results[0].stderr
    assert "begun by 1 process" in results[1].stderr and "begun by 1 process" in results[2].stderr


def test_shares_cover_the_rows_in_process_order():
    bounds = [distributed.share_bounds(11, p, 3) for p in range(3)]
    assert bounds == [(0, 4), (4, 8), (8, 11)]
    np.testing.assert_array_equal(np.concatenate([distributed.share(np.arange(11), p, 3) for p in range(3)]),
                                  np.arange(11))
    # A single process holds everything and gathers nothing.
    assert distributed.process_count() == 1 and distributed.is_writer()
    np.testing.assert_array_equal(distributed.gather_rows(np.ones((5, 2)), 5), np.ones((5, 2)))
    with pytest.raises(DN2Error, match="share"):
        distributed.gather_rows(np.ones((4, 2)), 5)


def test_process_flags_go_together_and_cluster_detection(monkeypatch):
    with pytest.raises(DN2Error, match="go together"):
        distributed.initialize(distributed.ProcessConfig(coordinator="127.0.0.1:1"))
    assert not distributed.cluster_detected({})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert distributed.cluster_detected({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})
    assert distributed.cluster_detected({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # no flags, no cluster: a single process, nothing initialised
