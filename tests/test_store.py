"""Embedding stores: round trips, crash/resume, refusing the wrong bank, detecting damage."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.store import (
    IncompleteStoreError,
    extract_to_store,
    open_store,
    save_threshold,
    write_store,
)

HELPER = Path(__file__).with_name("store_helper.py")
_spec = importlib.util.spec_from_file_location("store_helper", HELPER)
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)
META, N, CHUNK = helper.METADATA, helper.N, helper.CHUNK
WRITER_KEYS = ("created", "dn2_jax_version", "process_count", "device_count")


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _run_helper(*args: str, devices: int = 1, timeout: float = 120) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run(
        [sys.executable, str(HELPER), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _extract(path, n=10, embed=helper.fake_embed, **kw):
    return helper.extract_toy(path, embed, n, **{"chunk_size": 4, "batch_size": 3, **kw})


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(path: Path, edit) -> None:
    m = _manifest(path)
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("as_list", [False, True])
def test_round_trip(tmp_path, dtype, as_list):
    images, labels, ids = helper.toy_data(10)
    want = helper.fake_embed(images).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    store = extract_to_store(
        tmp_path / "s",
        list(images) if as_list else images,
        helper.fake_embed,
        metadata=META,
        labels=labels,
        ids=ids,
        chunk_size=4,
        batch_size=3,
        dtype=dtype,
        progress=False,
    )
    for s in (store, open_store(tmp_path / "s")):
        assert (s.count, s.dim, s.dtype) == (10, 6, want.dtype)
        assert {k: s.metadata[k] for k in META} == META
        assert (s.metadata["count"], s.metadata["dim"], s.metadata["dtype"], s.metadata["chunk_size"]) == (
            10,
            6,
            dtype,
            4,
        )
        assert s.embeddings(dtype=None).dtype == want.dtype
        assert _bits(s.embeddings(dtype=None)) == _bits(want)
        assert s.embeddings().dtype == np.float32
        np.testing.assert_array_equal(s.embeddings(), want.astype(np.float32))
        np.testing.assert_array_equal(s.labels, labels)
        np.testing.assert_array_equal(s.ids, ids)
        assert s.labels.dtype == s.ids.dtype == np.int64
        chunks = list(s.iter_chunks())
        assert [start for start, _ in chunks] == [0, 4, 8]
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), want.astype(np.float32))
        assert s.threshold is None


def test_complete_store_is_reused_not_recomputed(tmp_path):
    first = _extract(tmp_path / "s")

    def fail(images):
        raise AssertionError("embed_fn called for a complete store")

    again = _extract(tmp_path / "s", embed=fail)
    np.testing.assert_array_equal(again.embeddings(), first.embeddings())


def test_write_store_round_trip_and_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(7, 5)).astype(ml_dtypes.bfloat16)
    store = write_store(tmp_path / "q", emb, metadata=META, labels=np.arange(7) % 2, chunk_size=3)
    assert store.dtype == emb.dtype and _bits(open_store(tmp_path / "q").embeddings(dtype=None)) == _bits(emb)
    np.testing.assert_array_equal(store.ids, np.arange(7))
    with pytest.raises(DN2Error, match="already exists"):
        write_store(tmp_path / "q", emb, metadata=META)
    new = rng.normal(size=(4, 5)).astype(np.float32)
    store = write_store(tmp_path / "q", new, metadata=META, overwrite=True)
    assert _bits(open_store(tmp_path / "q").embeddings()) == _bits(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # No temporary directories left.


def test_invalid_arguments_write_nothing(tmp_path):
    images, _, _ = helper.toy_data(5)
    bad = [
        ({"metadata": {"backbone": "x"}}, "fingerprint"),
        ({"metadata": {**META, "count": 3}}, "count"),
        ({"metadata": {**META, "preset": (1, 2)}}, "JSON"),
        ({"labels": np.arange(4)}, "labels"),
        ({"dtype": "float16"}, "dtype"),
        ({"chunk_size": 0}, "chunk_size"),
    ]
    for kw, match in bad:
        with pytest.raises(DN2Error, match=match):
            extract_to_store(tmp_path / "s", images, helper.fake_embed, **{"metadata": META, "progress": False, **kw})
    with pytest.raises(DN2Error, match=r"embed_fn returned shape \(6,\)"):
        extract_to_store(tmp_path / "s", images, lambda x: np.zeros(6), metadata=META, progress=False)
    assert not (tmp_path / "s").exists()


def test_save_threshold(tmp_path):
    _extract(tmp_path / "s")
    store = save_threshold(tmp_path / "s", value=12.5, k=2, fpr=0.05, source="train")
    assert store.threshold == {"value": 12.5, "k": 2, "fpr": 0.05, "source": "train"}
    assert open_store(tmp_path / "s").threshold == store.threshold
    with pytest.raises(DN2Error, match="fpr"):
        save_threshold(tmp_path / "s", value=1.0, k=2, fpr=2.0)
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")] == []


def _interrupted(path: Path, after_chunks: int = 1) -> None:
    """Leaves an incomplete store: embed_fn fails once `after_chunks` chunks have committed."""
    calls = []

    def flaky(images):
        calls.append(len(images))
        if sum(calls) > after_chunks * 4:
            raise KeyboardInterrupt
        return helper.fake_embed(images)

    with pytest.raises(KeyboardInterrupt):
        _extract(path, embed=flaky, batch_size=2)


def test_incomplete_store_refused_then_resumed(tmp_path):
    _interrupted(tmp_path / "s", after_chunks=1)
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(1 of 3 chunks.*again to resume"):
        open_store(tmp_path / "s")
    resumed = _extract(tmp_path / "s")
    whole = _extract(tmp_path / "ref")
    assert _bits(resumed.embeddings()) == _bits(whole.embeddings())


def test_killed_before_final_manifest_completes_without_embedding(tmp_path):
    whole = _extract(tmp_path / "s").embeddings()
    _edit_manifest(tmp_path / "s", lambda m: m.update(complete=False, chunks=None))  # As before finalising.
    with pytest.raises(IncompleteStoreError, match=r"3 of 3 chunks"):
        open_store(tmp_path / "s")

    def fail(images):
        raise AssertionError("embed_fn called although every chunk is committed")

    assert _bits(_extract(tmp_path / "s", embed=fail).embeddings()) == _bits(whole)


def test_resume_refuses_a_store_for_other_data(tmp_path):
    _interrupted(tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    with pytest.raises(DN2Error, match=r"backbone: store has 'fake', this run has 'resnet50'"):
        _extract(tmp_path / "s", metadata={**META, "backbone": "resnet50"})
    with pytest.raises(DN2Error, match=r"labels_sha256"):
        _extract(tmp_path / "s", labels=np.zeros(10, int))
    with pytest.raises(DN2Error, match=r"chunk_size: store has 4, this run has 5"):
        _extract(tmp_path / "s", chunk_size=5)
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    _extract(tmp_path / "done")
    with pytest.raises(DN2Error, match=r"dataset: store has 'toy', this run has 'cifar10'"):
        _extract(tmp_path / "done", metadata={**META, "dataset": "cifar10"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DN2Error, match="not an embedding store"):
        _extract(tmp_path / "other")


def test_expect_mismatch_names_both_sides(tmp_path):
    _extract(tmp_path / "s")
    open_store(tmp_path / "s", expect={"backbone": "fake", "preset": META["preset"], "dim": 6})
    with pytest.raises(DN2Error) as e:
        open_store(tmp_path / "s", expect={"backbone": "efficientnet_lite0", "fingerprint": "cd34" * 16})
    msg = str(e.value)
    assert "backbone: store has 'fake', expected 'efficientnet_lite0'" in msg
    assert "'ab12ab12" in msg and "'cd34cd34" in msg and str(tmp_path / "s") in msg


def test_missing_chunk(tmp_path):
    _extract(tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "chunks" / "000001")
    with pytest.raises(DN2FileError, match="chunk 1 is missing"):
        open_store(tmp_path / "s")


def test_swapped_chunk_fails_checksum(tmp_path):
    _extract(tmp_path / "s")
    chunks = tmp_path / "s" / "chunks"
    shutil.rmtree(chunks / "000001")
    shutil.copytree(chunks / "000000", chunks / "000001")  # Same shape and dtype, other data.
    with pytest.raises(DN2FileError, match="chunk 1 .*sha256"):
        open_store(tmp_path / "s")


@pytest.mark.parametrize("pattern", ["d/*", "*", "_METADATA"])
def test_damaged_chunk_file(tmp_path, pattern):
    _extract(tmp_path / "s", n=12)
    files = [p for p in (tmp_path / "s" / "chunks" / "000001").glob(pattern) if p.is_file()]
    assert files
    for p in files:  # Flip the second half of the bytes of each file.
        data = bytearray(p.read_bytes())
        for i in range(len(data) // 2, len(data)):
            data[i] ^= 0x5A
        p.write_bytes(bytes(data))
    with pytest.raises(DN2FileError, match="chunk 1 .*damaged"):
        open_store(tmp_path / "s").embeddings()  # Damaged metadata fails on open, damaged data when read.
    with pytest.raises(DN2FileError, match="chunk 1 .*damaged"):
        open_store(tmp_path / "s", verify=True)


def test_altered_data_fails_checksum_when_read(tmp_path):
    _extract(tmp_path / "s")
    chunk = tmp_path / "s" / "chunks" / "000001"
    kept = (chunk / "_CHECKPOINT_METADATA").read_bytes()  # Holds the sha256 of the original data.
    shutil.rmtree(chunk)
    with ocp.PyTreeCheckpointer() as ckptr:  # Valid Orbax data of the right shape, but not what was embedded.
        ckptr.save(chunk, args=ocp.args.PyTreeSave({"embeddings": np.zeros((4, 6), np.float32)}))
    (chunk / "_CHECKPOINT_METADATA").write_bytes(kept)
    store = open_store(tmp_path / "s")
    assert next(store.iter_chunks())[0] == 0  # Chunk 0 is fine.
    with pytest.raises(DN2FileError, match="chunk 1 .*sha256 of 'embeddings' does not match"):
        store.embeddings()
    with pytest.raises(DN2FileError, match="chunk 1 .*sha256"):
        open_store(tmp_path / "s", verify=True)


@pytest.mark.parametrize("key, value", [("count", 9), ("dim", 7), ("dtype", "bfloat16"), ("chunk_size", 5)])
def test_metadata_disagreeing_with_arrays(tmp_path, key, value):
    _extract(tmp_path / "s")
    _edit_manifest(tmp_path / "s", lambda m: m["metadata"].update({key: value}))
    with pytest.raises(DN2FileError, match="disagrees|damaged"):
        open_store(tmp_path / "s")


def test_damaged_manifest(tmp_path):
    _extract(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"format": "dn2-embedd')
    with pytest.raises(DN2FileError, match="manifest.*damaged"):
        open_store(tmp_path / "s")
    with pytest.raises(DN2FileError, match="does not exist"):
        open_store(tmp_path / "nothing")


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, capsys):
    path = tmp_path / "s"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "crash", str(path), "0.15"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not (path / "chunks" / "000000").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no chunk committed in 90 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert _manifest(path)["complete"] is False
    done = sorted(p.name for p in (path / "chunks").iterdir() if p.name.isdigit())
    assert 1 <= len(done) < N // CHUNK
    with pytest.raises(IncompleteStoreError):
        open_store(path)
    # A half-written chunk as left by a kill during an Orbax save: removed and rewritten on resume.
    (path / "chunks" / "000005.orbax-checkpoint-tmp-123").mkdir()
    (path / "chunks" / "000005.orbax-checkpoint-tmp-123" / "junk").write_bytes(b"x")

    capsys.readouterr()
    resumed = helper.extract_toy(path, helper.fake_embed, progress=True)
    assert f"{len(done) * CHUNK}/{N}" in capsys.readouterr().err  # Progress starts at the committed count.
    whole = helper.extract_toy(tmp_path / "ref", helper.fake_embed)
    assert _bits(resumed.embeddings(dtype=None)) == _bits(whole.embeddings(dtype=None))
    assert _bits(resumed.labels) == _bits(whole.labels) and _bits(resumed.ids) == _bits(whole.ids)
    a, b = _manifest(path), _manifest(tmp_path / "ref")
    for m in (a, b):
        for k in WRITER_KEYS:
            m["metadata"].pop(k)
    assert a == b  # Same metadata, same per-chunk sha256.
    assert sorted(p.name for p in (path / "chunks").iterdir()) == [f"{i:06d}" for i in range(N // CHUNK)]


def test_written_with_4_devices_opens_with_1(tmp_path):
    _run_helper("sharded", str(tmp_path / "s"), devices=4)
    _run_helper("read", str(tmp_path / "s"), str(tmp_path / "out.npz"), devices=1)
    out = np.load(tmp_path / "out.npz")
    assert (int(out["writer_device_count"]), int(out["device_count"])) == (4, 1)
    images, labels, ids = helper.toy_data()
    want = helper.fake_embed(images).astype(ml_dtypes.bfloat16)
    assert _bits(out["embeddings"]) == _bits(want)
    np.testing.assert_array_equal(out["labels"], labels)
    np.testing.assert_array_equal(out["ids"], ids)


# ----------------------------------------------------------------------------------------------------------
# Relative paths, output checks, the writer lock (see also tests/test_faults.py).


def _tiny_folder(root: Path) -> str:
    """An MVTec-style folder of 8×8 RGB PNGs (train/good, test/good, test/bad); returns its dataset name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, kind, n in [("train", "good", 6), ("test", "good", 2), ("test", "bad", 2)]:
        (root / split / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / kind / f"{i}.png")
    return f"mvtec:{root}"


def _cli(capsys, *argv):
    from dn2_jax.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_relative_paths_through_the_library(tmp_path, monkeypatch):
    from dn2_jax.convert import restore_variables, save_variables

    monkeypatch.chdir(tmp_path)
    store = _extract("banks/bottle")
    assert store.path == tmp_path / "banks" / "bottle" and store.path.is_absolute()
    assert _bits(open_store("banks/bottle", verify=True).embeddings()) == _bits(store.embeddings())
    assert save_threshold("banks/bottle", value=1.0, k=1, fpr=0.1).threshold["k"] == 1
    written = write_store("banks/../q", store.embeddings(), metadata=META)
    assert written.path == tmp_path / "q"
    save_variables({"params": {"w": np.ones(3, np.float32)}}, "weights/../ck", {"backbone": "x"})
    variables, meta = restore_variables("ck")
    assert meta == {"backbone": "x"} and variables["params"]["w"].tolist() == [1.0] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banks", "ck", "q"]  # No locks or temporaries.


@pytest.mark.slow
def test_relative_store_path_through_the_cli(tmp_path, monkeypatch, capsys):
    """The README's flow with `--out banks/bottle` (failed with 'Checkpoint path should be absolute')."""
    monkeypatch.chdir(tmp_path)
    dataset = _tiny_folder(Path("widget")).replace(str(tmp_path) + "/", "")
    code, out, err = _cli(capsys, "embed", "--dataset", dataset, "--split", "train", "--backbone", "pixels",
                          "--out", "banks/bottle", "--chunk-size", "4")
    assert code == 0, err
    assert open_store(tmp_path / "banks" / "bottle", verify=True).count == 6
    code, out, err = _cli(capsys, "fit", "--store", "banks/bottle", "--k", "1", "--fpr", "0.2",
                          "--out", "detectors/bottle")
    assert code == 0, err
    code, out, err = _cli(capsys, "score", "detectors/bottle", "--dataset", dataset, "--split", "test",
                          "--out", "scores.json")
    assert code == 0, err
    assert len(json.loads(Path("scores.json").read_text())["scores"]) == 4


@pytest.mark.slow
def test_relative_cache_dir_weights_and_xdg_cache_home_for_eval(tmp_path, monkeypatch, capsys):
    """`dn2 eval` with relative --weights (a `dn2 convert`-style output) and a relative XDG_CACHE_HOME, hence a
    relative cache dir (the same path as a relative --cache-dir)."""
    import importlib

    import dn2_jax.cli
    from dn2_jax import models, save_variables

    monkeypatch.chdir(tmp_path)
    _tiny_folder(tmp_path / "widget")
    variables = models.init_random_variables("resnet18")
    Path("weights").mkdir()
    save_variables(variables, "weights/r18", {"backbone": "resnet18", "fingerprint": models.fingerprint(variables)})
    argv = ["eval", "--dataset", "mvtec:widget", "--backbone", "resnet18", "--weights", "weights/r18",
            "--input-size", "32", "--batch-size", "8", "--out", "run"]
    with monkeypatch.context() as env:
        env.setenv("XDG_CACHE_HOME", "xdg")
        importlib.reload(dn2_jax.cli)  # The default cache dir is read from the environment at import.
        try:
            code, _, err = _cli(capsys, *argv)
        finally:
            env.undo()
            importlib.reload(dn2_jax.cli)
    assert code == 0, err
    stores = sorted(p.parent for p in (tmp_path / "xdg" / "dn2-jax").rglob("manifest.json"))
    assert len(stores) == 2  # The train and the test split, in the relative default cache dir (as --cache-dir).
    for store in stores:
        open_store(store, verify=True)
    # Another writer's lock file and temporary directory beside the cached stores: skipped, stores reused.
    mtimes = {p: p.stat().st_mtime_ns for p in stores}
    for store in stores:
        (store.parent / f".{store.name}.lock").write_text("123")
        (store.parent / f".{store.name}.ab12.tmp").mkdir()
    code, _, err = _cli(capsys, *argv, "--cache-dir", "xdg/dn2-jax")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in stores} == mtimes


def test_folder_with_only_a_killed_writers_temporaries_is_resumed(tmp_path):
    """A kill during the very first manifest write left only `.manifest.json.<pid>.tmp`."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".manifest.json.4242.tmp").write_text('{"format": "dn2-emb')
    with pytest.raises(IncompleteStoreError, match="interrupted before the manifest was written"):
        open_store(tmp_path / "s")
    store = _extract(tmp_path / "s")
    assert _bits(store.embeddings()) == _bits(_extract(tmp_path / "ref").embeddings())
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["chunks", "index", "manifest.json"]


def test_write_store_of_the_same_data_is_idempotent(tmp_path):
    """Two `dn2 eval` publishing one cached store: the second finds it and returns it ('Destination … already
    exists' before)."""
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    first = write_store(tmp_path / "q", emb, metadata=META, chunk_size=2)
    mtime = (tmp_path / "q" / "manifest.json").stat().st_mtime_ns
    again = write_store(tmp_path / "q", emb, metadata=META, chunk_size=2)
    assert again.path == first.path and (tmp_path / "q" / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(DN2Error, match="already exists"):
        write_store(tmp_path / "q", emb, metadata={**META, "split": "test"}, chunk_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_check_writable(tmp_path):
    from dn2_jax.fileio import check_writable

    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_writable(tmp_path / "new.json") == tmp_path / "new.json"
    assert check_writable(tmp_path / "a" / "b", "dir", parents=True) == tmp_path / "a" / "b"
    cases = [
        (dict(path=tmp_path / "dir", kind="file"), DN2Error, "is an existing directory"),
        (dict(path=tmp_path / "file", kind="dir"), DN2Error, "exists and is not a directory"),
        (dict(path=tmp_path / "file", kind="file", overwrite=False), DN2Error, "already exists"),
        (dict(path=tmp_path / "missing" / "x.json"), DN2FileError, "parent directory .*missing' does not exist"),
        (dict(path=tmp_path / "file" / "x", kind="dir", parents=True), DN2FileError, "'.*file' is a file"),
        (dict(path=tmp_path / "file" / "x"), DN2FileError, "is a file"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            check_writable(**kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # Nothing created, no probe left.


@pytest.mark.parametrize(
    "argv, match",
    [
        (["embed", "--out", "{file}/bank"], "is a file"),
        (["embed", "--out", "{file}"], "exists and is not a directory"),
        (["embed", "--out", "{dir}"], "is not an embedding store"),
        (["convert", "missing.pth", "{tmp}/nowhere/dst", "--backbone", "resnet18"], "parent directory"),
        (["convert", "missing.pth", "{dir}", "--backbone", "resnet18"], "already exists"),
        (["eval", "--backbone", "pixels", "--no-cache", "--out", "{file}/run"], "is a file"),
    ],
)
def test_unwritable_outputs_fail_before_work_with_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    subst = {"file": tmp_path / "file", "dir": tmp_path / "dir", "tmp": tmp_path}
    if argv[0] == "embed":  # A dataset that does not exist: the output is checked first.
        argv = [*argv, "--dataset", "mvtec:/nonexistent", "--backbone", "pixels"]
    code, _, err = _cli(capsys, *[a.format(**subst) for a in argv])
    assert code == 2 and err.startswith("dn2: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_read_only_folder_is_refused_before_work():
    """A folder that refuses new files: `dn2 embed` fails on its first line, before loading data or a model, and
    a complete store there is still reused. Root ignores permission bits, so the helper drops to uid 65534."""
    root = Path(tempfile.mkdtemp(prefix="dn2-ro-"))  # Not under pytest's tmp_path, which only root may enter.
    try:
        os.chmod(root, 0o755)
        (root / "ro").mkdir()
        _extract(root / "ro" / "done")
        os.chmod(root / "ro", 0o555)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HELPER.parent.parent)}
        proc = subprocess.run([sys.executable, str(HELPER), "readonly", str(root / "ro")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [p.name for p in (root / "ro").iterdir()] == ["done"]
    finally:
        os.chmod(root / "ro", 0o755)
        shutil.rmtree(root)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop() == [True, "reused"], results
    for code, err in results:
        assert code == 2 and err.startswith("dn2: error:") and len(err.strip().splitlines()) == 1, err
        assert "cannot create files in" in err and "Permission denied" in err, err
