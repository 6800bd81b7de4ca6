"""Writing files safely: atomic writes, atomic directory publishing, writer locks, output checks, Orbax trees.

Everything dn2_jax writes goes through this module:

- `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json`: a temporary file in the same directory,
  fsync, `os.replace`; a reader sees the old file or the new one, never a part.
- `publish_dir`: renames a finished temporary directory into place (optionally replacing an old one).
- `writer_lock`: an exclusive `fcntl.flock` on `.<name>.lock` next to the output, held for a whole write and
  released by the kernel when the process dies (a `kill -9` never leaves a stale lock).
- `check_writable`: refuses an output that cannot be written (a file where a directory is needed or the
  reverse, a missing parent, a read-only folder) before any work is done.
- `save_tree` / `read_tree_metadata` / `restore_tree`: the one Orbax API (a pytree of host numpy arrays plus JSON
  metadata in one checkpoint directory), used by embedding stores and converted weights alike.

Paths are made absolute here (`absolute`), so every caller accepts paths relative to the working directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp

from dn2_jax.errors import DN2Error, DN2FileError

LOCK_TIMEOUT_ENV = "DN2_LOCK_TIMEOUT"
_TMP_SUFFIX = ".tmp"
_ORBAX_TMP = ".orbax-checkpoint-tmp"


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the working directory (`..` folded, symlinks kept)."""
    return Path(os.path.abspath(os.fspath(path)))


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of this module's (or Orbax's) temporaries."""
    return (name.startswith(".") and name.endswith(_TMP_SUFFIX)) or _ORBAX_TMP in name


# ---------------------------------------------------------------------------------------------------- atomic


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # Some file systems cannot open or fsync a directory.
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically: `.<name>.<pid>.<random>.tmp` in the same directory, fsync, replace.

    The parent directory must exist. On any failure the temporary file is removed and `path` is unchanged.
    Returns the absolute path.
    """
    path = absolute(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> Path:
    """`atomic_write_text` of `json.dumps(obj, **dump_kw)` (default indent=1, sort_keys=True) plus a newline."""
    return atomic_write_text(path, json.dumps(obj, **{"indent": 1, "sort_keys": True, **dump_kw}) + "\n")


def temporary_dir(path: str | os.PathLike) -> Path:
    """A new empty directory `.<name>.<random>.tmp` beside `path`, to build it in before `publish_dir`."""
    path = absolute(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent))


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Renames the finished directory `tmp` to `path` (same file system), atomically for a reader.

    An existing `path` is an error (DN2Error) unless `overwrite`; then the old directory is moved aside, the
    new one renamed in and the old one deleted, so `path` is never missing for longer than between two renames.
    Call it holding `writer_lock(path)` when other processes may publish the same path. Returns `path`.
    """
    tmp, path = absolute(tmp), absolute(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise DN2Error(f"'{path}' already exists; pass overwrite=True to replace it.")
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
        return path
    os.rename(tmp, path)  # Fails (does not merge) if another process created `path` meanwhile.
    _fsync_dir(path.parent)
    return path


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Creates the missing parent directories of `path`; returns those it created, outermost first."""
    path = absolute(path)
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for p in missing:
        with contextlib.suppress(FileExistsError):
            p.mkdir()
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Removes the directories `make_parents` created (innermost first), where they are still empty."""
    for p in reversed(dirs):
        with contextlib.suppress(OSError):
            p.rmdir()


# ---------------------------------------------------------------------------------------------------- checks


def _nearest_existing(path: Path) -> Path:
    for p in path.parents:
        if p.exists():
            return p
    return Path(path.anchor)


def _probe(directory: Path) -> OSError | None:
    """Whether a file can be created in `directory` (creates and removes one; root ignores mode bits)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dn2-probe-", suffix=_TMP_SUFFIX, dir=directory)
    except OSError as e:
        return e
    os.close(fd)
    os.unlink(name)
    return None


def check_writable(
    path: str | os.PathLike,
    kind: str = "file",
    *,
    overwrite: bool = True,
    parents: bool = False,
    what: str = "output",
) -> Path:
    """Refuses, before any work, an output that cannot be written; returns it as an absolute path.

    Args:
      path: the file or directory to be written.
      kind: "file" (path must not be a directory) or "dir" (path must not be a file).
      overwrite: whether an existing `path` may be replaced or written into; False refuses any existing path
        (an empty directory is accepted for kind "dir").
      parents: whether missing parent directories will be created; False requires the parent to exist.
      what: how the message names the output, e.g. "--out" or "dst".

    Raises:
      DN2Error: a directory where a file is needed (or the reverse), an existing path without `overwrite`.
      DN2FileError: a missing parent (with parents=False), a parent that is a file, a folder that refuses new
        files (read-only, no permission). Nothing is created.
    """
    if kind not in ("file", "dir"):
        raise DN2Error(f"kind must be 'file' or 'dir', got {kind!r}.")
    path = absolute(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise DN2Error(f"{what} '{path}' is an existing directory; a file is written there. Name a file.")
        if kind == "dir" and not path.is_dir():
            raise DN2Error(f"{what} '{path}' exists and is not a directory; choose another path.")
        if not overwrite and not (kind == "dir" and not any(path.iterdir())):
            raise DN2Error(f"{what} '{path}' already exists; pass overwrite=True (--overwrite) to replace it.")
    parent = path.parent if parents is False else _nearest_existing(path)
    if not parent.exists():
        raise DN2FileError(f"{what} '{path}': the parent directory '{parent}' does not exist; create it first.")
    if not parent.is_dir():
        raise DN2FileError(f"{what} '{path}': '{parent}' is a file, not a directory.")
    target = path if (kind == "dir" and path.is_dir()) else parent
    if (err := _probe(target)) is not None:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise DN2FileError(f"{what} '{path}': cannot create files in '{target}' ({reason}).")
    return path


# ---------------------------------------------------------------------------------------------------- lock


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.<name>.lock` beside it."""
    path = absolute(path)
    return path.with_name(f".{path.name}.lock")


def _lock_timeout(timeout: float | None) -> float | None:
    if timeout is not None:
        return timeout
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise DN2Error(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds.") from None


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, timeout: float | None = None, poll_s: float = 0.1) -> Iterator[Path]:
    """Holds an exclusive OS lock on `path` (a store or output) for the duration of the `with` block.

    The lock is `fcntl.flock` on `.<name>.lock` beside `path` (whose parent must exist); the kernel releases it
    when the process exits or is killed, so no lock is ever stale. The lock file is removed on release. A
    second writer prints one line to stderr and waits for the first; `timeout` (seconds; default: the
    environment variable DN2_LOCK_TIMEOUT, else wait as long as it takes) bounds the wait. Readers of a finished
    output need no lock.

    Raises:
      DN2Error: the lock was not obtained within `timeout`; the message names the holder's pid.
    """
    file = lock_path(path)
    timeout = _lock_timeout(timeout)
    start, told = time.monotonic(), False
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise DN2Error(
                    f"'{absolute(path)}' is being written by another process (pid {holder}); gave up after "
                    f"{waited:.0f} s. Wait for it to finish, or raise {LOCK_TIMEOUT_ENV}."
                ) from None
            if not told:
                print(
                    f"dn2: waiting for another process (pid {holder}) writing '{absolute(path)}' to finish…",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(poll_s)
            continue
        # The previous holder may have unlinked the file between our open and flock: then retry on the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # While still holding the lock, so no waiter holds a lock on a file others miss.
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- Orbax


def _clean_orbax_tmp(directory: Path) -> None:
    for tmp in directory.parent.glob(f"{directory.name}{_ORBAX_TMP}*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _checkpointer() -> Iterator[ocp.Checkpointer]:
    """A PyTree checkpointer. In a multi-process job (jax.distributed) every checkpoint dn2 writes is private to
    one process (its part of a store, process 0's outputs), but Orbax coordinates each save across all processes
    and writes host arrays from process 0 only: it is told that this process runs alone (index 0, no barriers)."""
    if jax.process_count() == 1:
        with ocp.PyTreeCheckpointer() as ckptr:
            yield ckptr
        return
    from orbax.checkpoint._src.multihost import multihost as ocp_multihost

    alone = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
    with mock.patch.object(ocp_multihost, "process_index", return_value=0), ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone
    ) as ckptr:
        yield ckptr


def save_tree(directory: str | os.PathLike, tree: Any, metadata: Mapping[str, Any]) -> Path:
    """Saves a pytree of host numpy arrays and JSON `metadata` as one Orbax checkpoint at `directory`.

    `directory` must not exist; Orbax writes into `<directory>.orbax-checkpoint-tmp…` and renames it when
    complete, so the checkpoint appears whole or not at all (a failed save removes the temporary directory).
    Returns the absolute directory.
    """
    directory = absolute(directory)
    tree = jax.tree.map(np.asarray, tree)
    try:
        with _checkpointer() as ckptr:
            ckptr.save(directory, args=ocp.args.PyTreeSave(tree), custom_metadata=dict(metadata))
    except BaseException:
        _clean_orbax_tmp(directory)
        raise
    return directory


def read_tree_metadata(directory: str | os.PathLike, what: str) -> tuple[dict[str, Any], Any]:
    """(JSON metadata, pytree of `jax.ShapeDtypeStruct`) of a checkpoint written by `save_tree`; reads no arrays.

    Raises:
      DN2FileError: `directory` is missing, an unfinished temporary, or not a readable Orbax checkpoint; the
        message starts with `what` (e.g. "chunk 3") and names the directory.
    """
    directory = absolute(directory)
    if not directory.is_dir() or ocp.path.step.is_path_temporary(directory):
        raise DN2FileError(f"{what} is missing: '{directory}' does not exist.")
    try:
        with _checkpointer() as ckptr:
            meta = ckptr.metadata(directory)
        shapes = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
            meta.item_metadata.tree,
        )
        custom = dict(meta.custom_metadata or {})
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
        raise DN2FileError(f"{what} at '{directory}' is damaged: cannot read its metadata ({e}).") from e
    return custom, shapes


def restore_tree(directory: str | os.PathLike, expected: Any, what: str) -> Any:
    """Restores a checkpoint written by `save_tree` as host numpy arrays.

    Args:
      directory: the checkpoint.
      expected: pytree of `jax.ShapeDtypeStruct` (e.g. from `read_tree_metadata`) giving the arrays wanted;
        arrays of the checkpoint not named in it are not read.
      what: how messages name the checkpoint.

    Raises:
      DN2FileError: damaged or unreadable checkpoint, or arrays whose shapes/dtypes differ from `expected`.
    """
    directory = absolute(directory)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), expected)
    try:
        with _checkpointer() as ckptr:
            out = ckptr.restore(
                directory,
                args=ocp.args.PyTreeRestore(item=expected, restore_args=restore_args, partial_restore=True),
            )
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
        raise DN2FileError(f"{what} at '{directory}' is damaged: Orbax cannot restore it ({e}).") from e
    got = jax.tree.map(lambda a: (a.shape, a.dtype), out)
    if got != jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)), expected):
        raise DN2FileError(f"{what} at '{directory}' is damaged: its arrays do not have the recorded shapes.")
    return out
