"""Toy data and subprocess entry points for tests/test_store.py (not collected by pytest).

python store_helper.py crash PATH DELAY_S   extract_to_store with an embed_fn that sleeps DELAY_S per batch
python store_helper.py sharded PATH         extract_to_store with an embed_fn sharded over all devices
python store_helper.py read PATH OUT.npz    open_store and save its arrays and device count
python store_helper.py kill PATH SPEC        extract_to_store that SIGKILLs itself at a point named by SPEC:
    "rename:TEXT:N"  at the N-th os.rename/os.replace whose source path contains TEXT (Orbax commits a chunk or
                     the index by renaming "<name>.orbax-checkpoint-tmp…"; the manifest by replacing a temp file)
    "fsync:TEXT:N"   at the N-th os.fsync of a file whose path contains TEXT (after writing, before the rename)
    "after:SECONDS"  from a timer thread, wherever the extraction is by then
python store_helper.py kills PREFIX SPEC...  imports once, then forks one `kill PREFIX<i> SPEC_i` child per SPEC
                                             (fast: the children skip the import); prints "SPEC_i <wait status>"
python store_helper.py race PATH_E PATH_W      forks two `embed PATH_E 0.15` and two `write PATH_W` at once;
                                             prints "status <exit code>" for each
python store_helper.py embed PATH DELAY_S    like crash, then prints "embedded N" (images this process embedded)
python store_helper.py write PATH            write_store of fake_embed(toy_data()), then prints "written"
python store_helper.py readonly DIR          as uid 65534 if root (imports first): `dn2 embed --out DIR/bank` and
                                             DIR/sub/bank, then extract_toy(DIR/done); prints JSON results
python store_helper.py hold PATH SECONDS     holds the writer lock of PATH, prints "held", sleeps
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np

N, CHUNK, BATCH = 24, 4, 2
METADATA = {
    "backbone": "fake",
    "fingerprint": "ab12" * 16,
    "preset": {"size": 4, "mean": [0.5, 0.25], "name": "toy"},
    "dataset": "toy",
    "split": "train",
}


def toy_data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 4, 4, 3) uint8 images, (n,) labels, (n,) ids."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return images, rng.integers(0, 3, n), 1000 + rng.permutation(n)


def fake_embed(images: np.ndarray) -> np.ndarray:
    """(B, ...) uint8 → (B, 6) float32: pixel sum, max, min and three pixels. Integer-valued, so exact."""
    x = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    return np.concatenate([x.sum(1, keepdims=True), x.max(1, keepdims=True), x.min(1, keepdims=True), x[:, :3]], 1)


def extract_toy(path, embed_fn, n: int = N, **kw):
    """extract_to_store of toy_data(n) with METADATA; keyword arguments override the defaults."""
    from dn2_jax.store import extract_to_store

    images, labels, ids = toy_data(n)
    kw = {
        "metadata": METADATA,
        "labels": labels,
        "ids": ids,
        "chunk_size": CHUNK,
        "batch_size": BATCH,
        "progress": False,
        **kw,
    }
    return extract_to_store(path, images, embed_fn, **kw)


def _crash(path: str, delay: float) -> None:
    def slow_embed(images):
        time.sleep(delay)
        return fake_embed(images)

    extract_toy(path, slow_embed)


def _sharded(path: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert jax.device_count() == 4, jax.devices()
    batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))

    @jax.jit
    def embed(x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return jnp.concatenate([x.sum(1, keepdims=True), x.max(1, keepdims=True), x.min(1, keepdims=True), x[:, :3]], 1)

    def sharded_embed(images):
        out = embed(jax.device_put(images, batch))
        assert len(out.sharding.device_set) == 4
        return out

    extract_toy(path, sharded_embed, chunk_size=8, batch_size=4, dtype="bfloat16")


def _read(path: str, out: str) -> None:
    import jax

    from dn2_jax.store import open_store

    store = open_store(path, expect=METADATA)
    np.savez(
        out,
        embeddings=store.embeddings(dtype=None),
        labels=store.labels,
        ids=store.ids,
        device_count=jax.device_count(),
        writer_device_count=store.metadata["device_count"],
    )


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill(path: str, spec: str) -> None:
    kind, *rest = spec.split(":")
    if kind == "after":
        threading.Timer(float(rest[0]), _die).start()
    elif kind in ("rename", "fsync"):
        text, nth = rest[0], int(rest[1])
        seen = [0]

        def hit(name: str) -> None:
            if text in name:
                seen[0] += 1
                if seen[0] == nth:
                    _die()

        if kind == "rename":
            for fn in ("rename", "replace"):
                real = getattr(os, fn)

                def patched(src, dst, *a, _real=real, **kw):
                    hit(os.fsdecode(src))
                    return _real(src, dst, *a, **kw)

                setattr(os, fn, patched)
        else:
            real_fsync = os.fsync

            def fsync(fd):
                try:
                    hit(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
                return real_fsync(fd)

            os.fsync = fsync
    else:
        raise SystemExit(f"unknown kill spec {spec!r}")
    extract_toy(path, fake_embed)
    raise SystemExit("the extraction finished before the kill point was reached")


def _kills(prefix: str, *specs: str) -> None:
    import dn2_jax.store  # noqa: F401  (imported once, before forking; nothing has started JAX yet)

    for i, spec in enumerate(specs):
        pid = os.fork()
        if pid == 0:
            try:
                _kill(f"{prefix}{i}", spec)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        print(spec, status, flush=True)


def _race(path_e: str, path_w: str) -> None:
    import dn2_jax.store  # noqa: F401  (imported once, before forking)

    pids = []
    for fn, args in ((_embed, (path_e, 0.15)), (_embed, (path_e, 0.15)), (_write, (path_w,)), (_write, (path_w,))):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn(*args)
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        print(f"status {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)


def _embed(path: str, delay: float) -> None:
    count = [0]

    def slow_embed(images):
        time.sleep(delay)
        count[0] += len(images)
        return fake_embed(images)

    extract_toy(path, slow_embed)
    print(f"embedded {count[0]}", flush=True)


def _write(path: str) -> None:
    from dn2_jax.store import write_store

    images, labels, ids = toy_data()
    write_store(path, fake_embed(images), metadata=METADATA, labels=labels, ids=ids, chunk_size=CHUNK)
    print("written", flush=True)


def _readonly(directory: str) -> None:
    import contextlib
    import io
    import json

    import dn2_jax.cli
    import dn2_jax.data  # noqa: F401  (imported while the interpreter's own files are still readable)
    import dn2_jax.evaluation  # noqa: F401

    if os.geteuid() == 0:  # Root ignores permission bits: drop to an unprivileged user.
        os.setgid(65534)
        os.setuid(65534)
    results = []
    for out in ("bank", "sub/bank"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = dn2_jax.cli.main(["embed", "--dataset", "mvtec:/nonexistent", "--backbone", "pixels",
                                     "--out", f"{directory}/{out}"])
        results.append([code, err.getvalue()])
    store = extract_toy(f"{directory}/done", fake_embed, n=10, chunk_size=4, batch_size=3)
    results.append([store.embeddings().tobytes() == fake_embed(toy_data(10)[0]).tobytes(), "reused"])
    print(json.dumps(results), flush=True)


def _hold(path: str, seconds: str) -> None:
    from dn2_jax.fileio import writer_lock

    with writer_lock(path):
        print("held", flush=True)
        time.sleep(float(seconds))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {
        "crash": lambda p, d: _crash(p, float(d)),
        "sharded": _sharded,
        "read": _read,
        "kill": _kill,
        "kills": _kills,
        "embed": lambda p, d: _embed(p, float(d)),
        "write": _write,
        "race": _race,
        "hold": _hold,
        "readonly": _readonly,
    }[mode](*args)
