"""Fault injection on embedding stores: kill -9 at every write step, damaged files, concurrent writers, locks.

The killed and racing writers are forked from one helper process (tests/store_helper.py `kills` / `race`), so
the suite pays for one import of JAX/Orbax per scenario family, not one per scenario.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.store import IncompleteStoreError, open_store

HELPER = Path(__file__).with_name("store_helper.py")
_spec = importlib.util.spec_from_file_location("store_helper", HELPER)
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)
N, CHUNK = helper.N, helper.CHUNK
WRITER_KEYS = ("created", "dn2_jax_version", "process_index", "process_count", "device_count")
SEED = int(os.environ.get("DN2_FAULT_SEED", "0"))  # Other seeds kill at other random moments.


def _helper(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HELPER.parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(HELPER), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _comparable(path: Path) -> dict:
    """The manifest without the keys that describe the writer (time, versions, devices)."""
    m = json.loads((path / "manifest.json").read_text())
    for k in WRITER_KEYS:
        m["metadata"].pop(k)
    return m


def _listing(path: Path) -> list[str]:
    """Every file and folder under `path` (Orbax's randomly named data files as "d/*"), and those beside it
    that start with its name (lock files, temporaries)."""
    inside = sorted({str(p.relative_to(path).parent / "*") if p.parent.name == "d" else str(p.relative_to(path))
                     for p in path.rglob("*")})  # How many data files ocdbt writes varies from run to run.
    beside = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))
    return inside + beside


def _assert_same_store(path: Path, ref: Path) -> None:
    a, b = open_store(path, verify=True), open_store(ref)
    assert _comparable(path) == _comparable(ref)  # Same metadata and the same sha256 for every chunk.
    for x, y in ((a.embeddings(dtype=None), b.embeddings(dtype=None)), (a.labels, b.labels), (a.ids, b.ids)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert _listing(path) == _listing(ref)  # No temporaries, no lock file left behind.


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "s"
    helper.extract_toy(path, helper.fake_embed)
    return path


@pytest.mark.slow
def test_kill_at_each_write_step_then_resume_is_bit_identical(tmp_path, reference):
    rng = random.Random(SEED)
    specs = [
        "fsync:.manifest.json:1",  # During the very first manifest write: only its temporary file exists.
        "rename:.manifest.json:1",  # Written and synced, not yet renamed.
        "rename:index.orbax-checkpoint-tmp:1",  # The index written, not yet committed.
        "rename:000000.orbax-checkpoint-tmp:1",  # The first chunk written, not yet committed.
        "rename:000003.orbax-checkpoint-tmp:1",  # Three chunks committed, the fourth in flight.
        "fsync:.manifest.json:2",  # Every chunk committed, the final manifest being written.
        *(f"after:{rng.uniform(0.05, 2.0):.3f}" for _ in range(2)),  # Random moments.
    ]
    out = _helper("kills", str(tmp_path / "k"), *specs)
    statuses = dict(line.rsplit(" ", 1) for line in out.splitlines() if line.split(" ")[0] in specs)
    for i, spec in enumerate(specs):
        path = tmp_path / f"k{i}"
        status = int(statuses[spec])
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or spec.startswith("after:"), f"{spec}: the writer was not killed (status {status})"
        if not killed:  # A random moment after the extraction had finished: nothing to resume.
            _assert_same_store(path, reference)
            continue
        if spec == "fsync:.manifest.json:1":
            assert [p.name for p in path.iterdir()][0].startswith(".manifest.json.")  # The state of the issue.
        if path.exists():
            with pytest.raises(IncompleteStoreError, match="again"):
                open_store(path)
        committed = len(list((path / "chunks").glob("[0-9]" * 6))) if path.exists() else 0
        embedded = []

        def counting(images, embedded=embedded):
            embedded.append(len(images))
            return helper.fake_embed(images)

        helper.extract_toy(path, counting)
        assert sum(embedded) == N - committed * CHUNK, spec  # Committed chunks are kept, the rest embedded.
        _assert_same_store(path, reference)


def _corrupt(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "flip":
        file.write_bytes(data[: len(data) // 2] + bytes(b ^ 0x5A for b in data[len(data) // 2 :]) if data else b"x")
    elif how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_every_damaged_file_is_named_or_harmless(tmp_path, reference, how):
    """Damage each file of a store (manifest, index and chunk arrays and metadata) in turn: opening it with
    verify=True either raises DN2FileError naming the damaged part, or returns exactly the original data."""
    files = [reference / "manifest.json", reference / "index" / "_CHECKPOINT_METADATA"]
    files += sorted((reference / "index" / "d").iterdir())  # The index is a checkpoint like a chunk.
    files += sorted(p for p in (reference / "chunks" / "000001").rglob("*") if p.is_file())  # Every file of one.
    assert len(files) > 10
    detected = []
    for file in files:
        rel = file.relative_to(reference)
        part = Path(*rel.parts[: 2 if rel.parts[0] == "chunks" else 1])  # manifest.json, index or chunks/00000i
        path = tmp_path / f"s-{len(detected)}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(reference, path)
        _corrupt(path / rel, how)
        try:
            store = open_store(path, verify=True)
        except DN2FileError as e:
            assert str(path / part) in str(e) or (rel == part and str(path) in str(e)), (rel, str(e))
            detected.append(str(rel))
            continue
        except Exception as e:  # noqa: BLE001  (any other exception type is a failure of this test)
            pytest.fail(f"{how} {rel}: {type(e).__name__} instead of DN2FileError: {e}")
        ref = open_store(reference)
        assert store.embeddings(dtype=None).tobytes() == ref.embeddings(dtype=None).tobytes(), (how, rel)
        assert store.labels.tobytes() == ref.labels.tobytes() and store.ids.tobytes() == ref.ids.tobytes()
    # The manifest, the array data and the metadata holding the sha256 can never be damaged unnoticed.
    must = ["manifest.json", "index/_CHECKPOINT_METADATA", "chunks/000001/_CHECKPOINT_METADATA"]
    must += [str(p.relative_to(reference)) for p in (reference / "chunks" / "000001" / "d").iterdir()]
    assert set(must) <= set(detected), sorted(set(must) - set(detected))


@pytest.mark.slow
def test_two_concurrent_writers_end_with_one_complete_store(tmp_path, reference):
    out = _helper("race", str(tmp_path / "e"), str(tmp_path / "w"))
    lines = out.splitlines()
    # Two extract_to_store on one store: one embeds everything, the other waits, then reuses it.
    assert sorted(ln for ln in lines if ln.startswith("embedded")) == ["embedded 0", f"embedded {N}"], out
    assert any("waiting for another process" in ln for ln in lines), out
    # Two write_store of the same data (the publish step of `dn2 eval`): both succeed.
    assert [ln for ln in lines if ln == "written"] == ["written", "written"], out
    assert [ln for ln in lines if ln.startswith("status")] == ["status 0"] * 4, out
    _assert_same_store(tmp_path / "e", reference)
    w = open_store(tmp_path / "w", verify=True)
    ref = open_store(reference)
    assert w.embeddings(dtype=None).tobytes() == ref.embeddings(dtype=None).tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "w"]  # No temporaries or lock files.


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, str(os.getpid()).encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


def test_lock_holder_makes_writer_wait_and_a_killed_holder_leaves_no_stale_lock(tmp_path, reference):
    path = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".s.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        t = time.monotonic()
        with pytest.raises(DN2Error, match=rf"being written by another process \(pid {holder.pid}\); gave up"):
            helper.extract_toy(path, helper.fake_embed, lock_timeout=0.3)
        assert time.monotonic() - t < 10
        assert not path.exists()  # Nothing written while waiting.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    assert (tmp_path / ".s.lock").exists()  # The holder's lock file stays, but the kernel released its lock.
    helper.extract_toy(path, helper.fake_embed, lock_timeout=0.3)
    _assert_same_store(path, reference)
