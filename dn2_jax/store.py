"""Embedding stores: `(N, D)` features saved with Orbax in atomically committed chunks.

A store is a directory::

  manifest.json    metadata, "complete" flag, sha256 of every chunk, optional threshold (replaced atomically)
  index/           Orbax checkpoint {"labels": (N,) int64, "ids": (N,) int64}
  chunks/000000/   Orbax checkpoint {"embeddings": (chunk_size, D)} float32 or bfloat16
  chunks/000001/   ...

Orbax writes every checkpoint into a temporary directory and renames it when it is complete, and the manifest
is replaced atomically (`fileio.atomic_write_json`), so a process killed at any moment loses at most the chunk
in flight, and `extract_to_store` resumes from the committed chunks (a folder holding nothing but a killed
writer's temporaries is started afresh). Writers hold an OS lock (`fileio.writer_lock`, `.<name>.lock` beside
the store) for the whole write, so two writers of one store never interleave: the second waits, then finds the
store complete. Readers take no lock. Relative paths are taken from the working directory.

Arrays are saved from host memory and restored as numpy, so a store written by a process with any
number of devices opens in a process with any other.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dn2_jax import fileio
from dn2_jax.errors import DN2Error, DN2FileError

FORMAT = "dn2-embedding-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = "parts.json"  # the manifest of a multi-part store (one part per process of a jax.distributed job)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_NUMPY_DTYPES = {**DTYPES, "int64": np.dtype(np.int64)}
# Keys the store adds to the metadata; callers may not set them.
STORE_KEYS = (
    "count",
    "dim",
    "dtype",
    "chunk_size",
    "dn2_jax_version",
    "created",
    "process_index",
    "process_count",
    "device_count",
)
# Keys that describe the writer rather than the data: ignored when a run resumes another's store.
_WRITER_KEYS = ("dim", "dn2_jax_version", "created", "process_index", "process_count", "device_count")
REQUIRED_KEYS = ("backbone", "fingerprint", "preset", "dataset", "split")


class IncompleteStoreError(DN2FileError):
    """A store whose extraction was interrupted; running the same extraction again resumes it."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers: hashing, JSON, Orbax I/O.


def _sha256(a: np.ndarray) -> str:
    """Hex sha256 of the raw bytes of `a` (C order)."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _differences(store: Mapping[str, Any], other: Mapping[str, Any], keys: Sequence[str], side: str) -> str:
    """'key: store has X, <side> Y' for every key whose values differ, joined by '; '."""
    diffs = [
        f"{k}: store has {_short(store.get(k))}, {side} {_short(other.get(k))}"
        for k in keys
        if store.get(k) != other.get(k)
    ]
    return "; ".join(diffs)


def _save(directory: Path, tree: dict[str, np.ndarray]) -> None:
    """Commits host arrays as one Orbax checkpoint (temp dir, then rename) with their sha256 as metadata."""
    fileio.save_tree(directory, tree, {"sha256": {k: _sha256(v) for k, v in tree.items()}})


def _read_meta(directory: Path, what: str) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(sha256 per array, (shape, dtype name) per array) of a committed checkpoint; reads no array data."""
    custom, shapes = fileio.read_tree_metadata(directory, what)
    try:
        arrays = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in shapes.items()}
        sha = {str(k): str(v) for k, v in custom["sha256"].items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise DN2FileError(f"{what} at '{directory}' is damaged: its metadata lacks the sha256 of its arrays.") from e
    return sha, arrays


def _restore(
    directory: Path, arrays: Mapping[str, tuple[tuple[int, ...], str]], sha: Mapping[str, str], what: str
) -> dict[str, np.ndarray]:
    """Restores the named arrays as host numpy and checks each against its sha256."""
    item = {k: jax.ShapeDtypeStruct(shape, _NUMPY_DTYPES[dt]) for k, (shape, dt) in arrays.items()}
    out = fileio.restore_tree(directory, item, what)
    for k, v in out.items():
        if _sha256(v) != sha[k]:
            raise DN2FileError(
                f"{what} at '{directory}' is damaged: the sha256 of '{k}' does not match the "
                "manifest. Re-create the store."
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# Manifest.


def _version() -> str:
    try:
        return importlib.metadata.version("dn2-jax")
    except importlib.metadata.PackageNotFoundError:
        import dn2_jax

        return dn2_jax.__version__


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise DN2Error(f"metadata must be a dict, got {type(metadata).__name__}.")
    if missing := [k for k in REQUIRED_KEYS if k not in metadata]:
        raise DN2Error(f"metadata lacks {missing}; an embedding store records {list(REQUIRED_KEYS)}.")
    if reserved := [k for k in STORE_KEYS if k in metadata]:
        raise DN2Error(f"metadata sets {reserved}, which the store records itself; remove them.")
    try:
        same = json.loads(json.dumps(dict(metadata))) == dict(metadata)
    except (TypeError, ValueError):
        same = False
    if not same:
        raise DN2Error(
            "metadata must be plain JSON data (str keys; str, int, float, bool, None, list, dict values): "
            f"got {_short(dict(metadata))}."
        )
    return dict(metadata)


def _new_manifest(
    metadata: Mapping[str, Any], count: int, chunk_size: int, dtype: str, labels: np.ndarray, ids: np.ndarray
) -> dict[str, Any]:
    meta = {
        **_check_metadata(metadata),
        "count": count,
        "dim": None,
        "dtype": dtype,
        "chunk_size": chunk_size,
        "dn2_jax_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_index": jax.process_index(),  # per-process stores of a multi-host job: which share this is
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "metadata": meta,
        "index_sha256": {"labels": _sha256(labels), "ids": _sha256(ids)},
        "chunks": None,
        "threshold": None,
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.exists():
        raise DN2FileError(f"embedding store '{path}' does not exist.")
    if not file.is_file():
        if path.is_dir() and _only_temporaries(path):
            raise IncompleteStoreError(
                f"embedding store '{path}' is incomplete: it holds no {MANIFEST} yet (empty, or only a killed "
                "writer's temporaries; its extraction was interrupted before the manifest was written). Run the "
                "same extraction (`dn2 embed` / extract_to_store) again."
            )
        raise DN2FileError(f"'{path}' is not an embedding store: it has no {MANIFEST}.")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DN2FileError(f"the manifest '{file}' is damaged: {e}.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DN2FileError(f"'{file}' is not a {FORMAT} manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DN2FileError(
            f"'{file}' has format version {manifest.get('format_version')}; this dn2_jax reads "
            f"version {FORMAT_VERSION}. Re-create the store."
        )
    meta = manifest.get("metadata")
    fields = {"count": int, "chunk_size": int, "dtype": str, "dim": (int, type(None))}
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in fields.items()):
        raise DN2FileError(f"the manifest '{file}' is damaged: its metadata lacks {list(fields)}.")
    return manifest


def _only_temporaries(path: Path) -> bool:
    """Whether the directory holds nothing but temporaries a killed writer may leave (or nothing at all)."""
    return all(fileio.is_temporary(p.name) for p in path.iterdir())


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What must agree for a run to resume (or reuse) an existing store: the data, not the writer."""
    meta = {k: v for k, v in manifest["metadata"].items() if k not in _WRITER_KEYS}
    return {**meta, **{f"{k}_sha256": v for k, v in manifest["index_sha256"].items()}}


def _num_chunks(meta: Mapping[str, Any]) -> int:
    return math.ceil(meta["count"] / meta["chunk_size"])


def _chunk_dir(path: Path, i: int) -> Path:
    return path / "chunks" / f"{i:06d}"


# ----------------------------------------------------------------------------------------------------------
# The store.


class EmbeddingStore:
    """A complete embedding store opened for reading. Build one with `open_store`.

    Attributes:
      path: the store directory.
      metadata: caller metadata plus count, dim, dtype, chunk_size, dn2_jax_version, created, process_index,
        process_count, device_count (of the writer).
    """

    manifest_file = MANIFEST

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self._manifest = manifest
        self._index: dict[str, np.ndarray] | None = None

    def __repr__(self) -> str:
        m = self.metadata
        return f"EmbeddingStore('{self.path}', count={m['count']}, dim={m['dim']}, dtype={m['dtype']})"

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest["metadata"]))  # A deep copy.

    @property
    def count(self) -> int:
        return self._manifest["metadata"]["count"]

    @property
    def dim(self) -> int:
        return self._manifest["metadata"]["dim"]

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype: float32 or bfloat16."""
        return DTYPES[self._manifest["metadata"]["dtype"]]

    @property
    def threshold(self) -> dict[str, Any] | None:
        """The threshold saved by `save_threshold` ({"value", "k", "fpr", ...}), or None."""
        t = self._manifest.get("threshold")
        return None if t is None else dict(t)

    def _load_index(self) -> dict[str, np.ndarray]:
        if self._index is None:
            arrays = {k: ((self.count,), "int64") for k in ("labels", "ids")}
            self._index = _restore(self.path / "index", arrays, self._manifest["index_sha256"], "the index")
        return self._index

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64."""
        return self._load_index()["labels"]

    @property
    def ids(self) -> np.ndarray:
        """(N,) int64 sample ids."""
        return self._load_index()["ids"]

    def iter_chunks(self, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start, (n, D) embeddings[start:start + n]) chunk by chunk; dtype None keeps the stored one.

        Every chunk is checked against its sha256 as it is read.
        """
        for i, chunk in enumerate(self._manifest["chunks"]):
            arrays = {"embeddings": ((chunk["size"], self.dim), self._manifest["metadata"]["dtype"])}
            emb = _restore(_chunk_dir(self.path, i), arrays, chunk["sha256"], f"chunk {i}")["embeddings"]
            yield chunk["start"], emb if dtype is None else emb.astype(dtype, copy=False)

    def embeddings(self, dtype: Any = np.float32) -> np.ndarray:
        """All (N, D) embeddings in host memory, for banks that fit; dtype None keeps the stored dtype."""
        out = np.empty((self.count, self.dim), dtype=self.dtype if dtype is None else dtype)
        for start, emb in self.iter_chunks(dtype):
            out[start : start + len(emb)] = emb
        return out

    def verify(self) -> None:
        """Reads every array and checks its sha256 (a full read of the store)."""
        self._load_index()
        for _ in self.iter_chunks(dtype=None):
            pass


def _check_structure(path: Path, manifest: Mapping[str, Any]) -> None:
    """Cheap integrity checks (Orbax metadata only, no array data): every chunk present, committed, with the
    shape, dtype and sha256 the manifest records."""
    meta, chunks = manifest["metadata"], manifest["chunks"]
    count, dim, dtype, size = meta["count"], meta["dim"], meta["dtype"], meta["chunk_size"]
    if len(chunks) != _num_chunks(meta):
        raise DN2FileError(
            f"embedding store '{path}' is damaged: its manifest lists {len(chunks)} chunks for "
            f"count={count} and chunk_size={size}."
        )
    sha, arrays = _read_meta(path / "index", "the index")
    want = {"labels": ((count,), "int64"), "ids": ((count,), "int64")}
    if arrays != want or sha != manifest["index_sha256"]:
        raise DN2FileError(
            f"the index of embedding store '{path}' disagrees with its manifest: it holds "
            f"{arrays}, the manifest says {want} (count={count})."
        )
    for i, chunk in enumerate(chunks):
        start, n = i * size, min(size, count - i * size)
        sha, arrays = _read_meta(_chunk_dir(path, i), f"chunk {i}")
        want = {"embeddings": ((n, dim), dtype)}
        if arrays != want or (chunk["start"], chunk["size"]) != (start, n):
            raise DN2FileError(
                f"chunk {i} of embedding store '{path}' disagrees with the manifest: it holds "
                f"{arrays}, the manifest (count={count}, dim={dim}, dtype={dtype}) needs {want}."
            )
        if sha != chunk["sha256"]:
            raise DN2FileError(
                f"chunk {i} of embedding store '{path}' is not the one its manifest lists "
                "(sha256 differs). Re-create the store."
            )


def _remove_temporaries(folder: Path) -> None:
    """Removes the temporary files and directories a killed writer left in `folder` (call holding the lock)."""
    for p in folder.iterdir() if folder.is_dir() else ():
        if fileio.is_temporary(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _committed_chunks(path: Path, n: int) -> list[int]:
    """Indices of committed chunks (Orbax renames a chunk into place only once it is complete)."""
    return [i for i in range(n) if _chunk_dir(path, i).is_dir()]


def open_store(
    path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None, verify: bool = False
) -> EmbeddingStore:
    """Opens a complete store, checking its integrity and, if given, that its metadata matches `expect`.

    Takes no lock: a complete store is never modified in place (only `save_threshold` replaces its manifest,
    atomically).

    Args:
      path: the store directory (relative paths are taken from the working directory).
      expect: metadata the caller relies on, e.g. {"backbone": ..., "fingerprint": ..., "preset": ...}.
      verify: also read every array now and check its sha256 (otherwise this happens as arrays are read).

    Raises:
      IncompleteStoreError: the extraction was interrupted (resume it by running it again).
      DN2FileError: missing, truncated or damaged store.
      DN2Error: metadata that differs from `expect`; the message names both sides.
    """
    path = fileio.absolute(path)
    if (path / PARTS).is_file() or (not (path / MANIFEST).is_file() and _part_counts(path)):
        return _open_parts(path, expect, verify)
    manifest = _read_manifest(path)
    if not manifest["complete"]:
        meta = manifest["metadata"]
        done = len(_committed_chunks(path, _num_chunks(meta)))
        raise IncompleteStoreError(
            f"embedding store '{path}' is incomplete ({done} of {_num_chunks(meta)} chunks committed): its "
            "extraction was interrupted. Run the same extraction (`dn2 embed` / extract_to_store) again "
            "to resume."
        )
    _check_structure(path, manifest)
    return _checked(EmbeddingStore(path, manifest), expect, verify)


def _checked(store: EmbeddingStore, expect: Mapping[str, Any] | None, verify: bool) -> EmbeddingStore:
    """`store` once its metadata matches `expect` (and, with `verify`, every array its sha256)."""
    path = store.path
    if expect:
        meta = store.metadata
        if diffs := _differences(meta, expect, list(expect), "expected"):
            raise DN2Error(
                f"embedding store '{path}' (backbone {_short(meta.get('backbone'))}, fingerprint "
                f"{_short(meta.get('fingerprint'))}) does not match what is needed: {diffs}."
            )
    if verify:
        store.verify()
    return store


# ----------------------------------------------------------------------------------------------------------
# Writing.


def _index_arrays(count: int, labels: Any, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 labels (default -1) and ids (default arange(N))."""
    out = []
    for name, value, default in (("labels", labels, np.full(count, -1)), ("ids", ids, np.arange(count))):
        a = np.asarray(default if value is None else value)
        if a.shape != (count,) or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise DN2Error(f"{name} must be {count} integers (one per image), got shape {a.shape} {a.dtype}.")
        out.append(a.astype(np.int64))
    return out[0], out[1]


def _runs(chunks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted chunk numbers as [first, last + 1) runs of consecutive ones."""
    runs: list[list[int]] = []
    for i in sorted(chunks):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _embed_chunks(
    images: Any,
    indices: np.ndarray,
    embed_fn: Callable[[np.ndarray], Any],
    chunks: Sequence[int],
    chunk_size: int,
    batch_size: int,
    dtype: np.dtype,
    bar: tqdm,
    stream: Mapping[str, Any],
) -> Iterator[tuple[int, np.ndarray]]:
    """(i, (n_i, D) host array of `dtype`) for each chunk i in `chunks`: embed_fn over ``images[indices[r]]``
    for its rows r, batches streamed by `pipeline.batches` (read ahead in threads, one image shape each)."""
    from dn2_jax import pipeline

    count = len(indices)
    for first, last in _runs(chunks):
        batches = pipeline.batches(images, indices, batch_size, start=first * chunk_size,
                                   stop=min(count, last * chunk_size), chunk_size=chunk_size, **stream)
        emb, filled = None, 0
        for positions, batch in batches:
            i = int(positions[0]) // chunk_size
            out = np.asarray(embed_fn(batch))  # Gathers device arrays to host.
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise DN2Error(f"embed_fn returned shape {out.shape} for a batch of {len(batch)} images; "
                               f"expected ({len(batch)}, D).")
            if emb is None:
                emb = np.empty((min(chunk_size, count - i * chunk_size), out.shape[1]), dtype)
            emb[positions - i * chunk_size] = out
            filled += len(batch)
            bar.update(len(batch))
            if filled == len(emb):
                yield i, emb
                emb, filled = None, 0


def _row_indices(n: int, indices: Any) -> np.ndarray:
    """(N,) int64 source index of each store row; default arange(n)."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    a = np.asarray(indices)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() >= n)):
        raise DN2Error(f"indices must be 1-D integers in [0, {n}) (the images' count), got shape {a.shape} {a.dtype}.")
    return a.astype(np.int64)


def check_store_path(path: str | os.PathLike, what: str = "embedding store") -> Path:
    """Refuses, before any work, a store path that cannot be written; returns it absolute.

    Accepted: a missing path (its missing parents are created later), an empty directory, an existing store
    (complete: reused if it holds the same data; incomplete: resumed), or a folder with nothing but a killed
    writer's temporaries.

    Raises:
      DN2Error: the path is a file, or a directory that is not an embedding store.
      DN2FileError: a parent is a file, or the folder refuses new files (read-only, no permission).
    """
    path = fileio.check_writable(path, "dir", parents=True, what=what)
    if path.is_dir() and not (path / MANIFEST).is_file() and not _is_parts_dir(path):
        raise DN2Error(f"{what} '{path}' exists and is not an embedding store (no {MANIFEST}); refusing to write "
                       "into it. Choose another path.")
    return path


def _existing_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, None if there is nothing there; errors for anything that is not a store.

    Call holding the writer lock: a folder with nothing but a killed writer's temporaries (e.g. a manifest
    whose very first write was interrupted) is cleaned and treated as empty.
    """
    if not path.exists():
        return None
    if not path.is_dir():
        raise DN2Error(f"'{path}' exists and is not a directory; choose another store path.")
    if not (path / MANIFEST).is_file():
        if not _only_temporaries(path):
            raise DN2Error(
                f"'{path}' exists and is not an embedding store (no {MANIFEST}); refusing to write into it."
            )
        _remove_temporaries(path)
        return None
    return _read_manifest(path)


def _finalize(path: Path, manifest: dict[str, Any]) -> None:
    """Checks every committed chunk, records their sha256 and dim, and marks the store complete."""
    meta = manifest["metadata"]
    chunks, dims = [], set()
    for i in range(_num_chunks(meta)):
        sha, arrays = _read_meta(_chunk_dir(path, i), f"chunk {i}")
        dims.add(arrays["embeddings"][0][1])
        chunks.append({"start": i * meta["chunk_size"], "size": arrays["embeddings"][0][0], "sha256": sha})
    if len(dims) != 1:
        raise DN2FileError(f"the chunks of '{path}' have different dims {sorted(dims)}; re-create the store.")
    manifest = {**manifest, "complete": True, "chunks": chunks, "metadata": {**meta, "dim": dims.pop()}}
    fileio.atomic_write_json(path / MANIFEST, manifest)


def _drop_unreadable(path: Path, manifest: Mapping[str, Any], done: list[int]) -> set[int]:
    """Committed chunks (and the index) of a store being resumed whose metadata cannot be read are removed, to
    be written again; returns the chunks that stay."""
    try:
        sha, _ = _read_meta(path / "index", "the index")
        if sha != manifest["index_sha256"]:
            raise DN2FileError("index differs from the manifest")
    except DN2FileError:
        shutil.rmtree(path / "index", ignore_errors=True)
    keep = set()
    for i in done:
        try:
            _read_meta(_chunk_dir(path, i), f"chunk {i}")
            keep.add(i)
        except DN2FileError:
            shutil.rmtree(_chunk_dir(path, i))
    return keep


def _validate_extraction(count: int, chunk_size: Any, batch_size: Any, dtype: Any) -> None:
    if count == 0:
        raise DN2Error("images is empty; nothing to embed.")
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise DN2Error(f"{name} must be a positive int, got {value!r}.")
    if dtype not in DTYPES:
        raise DN2Error(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")


@contextlib.contextmanager
def _locked(path: Path, timeout: float | None) -> Iterator[None]:
    """Creates the missing parents of `path` and holds its writer lock; parents stay only if something was
    written into them."""
    created = fileio.make_parents(path)
    try:
        with fileio.writer_lock(path, timeout=timeout):
            yield
    finally:
        fileio.remove_empty_dirs(created)


def _complete_same(path: Path, manifest: Mapping[str, Any]) -> EmbeddingStore | None:
    """The complete store at `path` if it holds the data `manifest` describes, else None."""
    if not (path / MANIFEST).is_file():
        return None
    existing = _read_manifest(path)
    mine, theirs = _identity(manifest), _identity(existing)
    if not existing["complete"] or _differences(theirs, mine, sorted(set(mine) | set(theirs)), ""):
        return None
    return open_store(path)


# Why an existing store's identity differs from a run's, for the keys a user can change without noticing.
_DIFF_HINTS = {
    "files": "the source's image files changed since the store was begun: a file added, removed, resized, "
    "modified or skipped",
    "ids_sha256": "the rows are other images or in another order: another source order, subset or split",
}


def _extract_locked(
    path: Path,
    images: Sequence[Any] | np.ndarray,
    indices: np.ndarray,
    embed_fn: Callable[[np.ndarray], Any],
    manifest: dict[str, Any],
    labels: np.ndarray,
    ids: np.ndarray,
    batch_size: int,
    progress: bool,
    stream: Mapping[str, Any],
) -> EmbeddingStore:
    """extract_to_store once the arguments are checked and the writer lock is held."""
    existing = _existing_manifest(path)
    if existing is not None:
        mine, theirs = _identity(manifest), _identity(existing)
        if diffs := _differences(theirs, mine, sorted(set(mine) | set(theirs)), "this run has"):
            why = "".join(f" ({v})" for k, v in _DIFF_HINTS.items() if theirs.get(k) != mine.get(k))
            raise DN2Error(
                f"'{path}' already holds an embedding store for other data or another model: {diffs}{why}. "
                "Use another path, or delete it to re-embed."
            )
        if existing["complete"]:
            return open_store(path)
        manifest = existing
        _remove_temporaries(path)
        _remove_temporaries(path / "chunks")

    meta = manifest["metadata"]
    count, chunk_size, dtype = meta["count"], meta["chunk_size"], DTYPES[meta["dtype"]]
    n = _num_chunks(meta)
    done = _drop_unreadable(path, manifest, _committed_chunks(path, n)) if existing is not None else set()
    initial = sum(min(chunk_size, count - i * chunk_size) for i in done)
    with tqdm(
        total=count,
        initial=initial,
        unit="img",
        desc=f"embedding → {path.name}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        todo = sorted(set(range(n)) - done)
        for i, emb in _embed_chunks(images, indices, embed_fn, todo, chunk_size, batch_size, dtype, bar, stream):
            if existing is None:  # Nothing is written before the first chunk is computed.
                path.mkdir(exist_ok=True)
                fileio.atomic_write_json(path / MANIFEST, manifest)
                existing = manifest
            if not (path / "index").is_dir():
                _save(path / "index", {"labels": labels, "ids": ids})
            _save(_chunk_dir(path, i), {"embeddings": emb})
    if not (path / "index").is_dir():  # Every chunk was kept but the index was damaged.
        _save(path / "index", {"labels": labels, "ids": ids})
    _finalize(path, manifest)
    return open_store(path)


def extract_to_store(
    path: str | os.PathLike,
    images: Sequence[Any] | np.ndarray,
    embed_fn: Callable[[np.ndarray], Any],
    *,
    metadata: Mapping[str, Any],
    labels: Any = None,
    ids: Any = None,
    indices: Any = None,
    chunk_size: int = 4096,
    batch_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
    lock_timeout: float | None = None,
    threads: int | None = None,
    prefetch: int | None = None,
) -> EmbeddingStore:
    """Embeds `images` into a store at `path`, one atomically committed chunk at a time; resumes partial ones.

    The whole write holds an OS lock (`fileio.writer_lock`): a second writer of the same store waits for the
    first, then finds the store complete and returns it without embedding anything.

    Args:
      path: store directory (created, with missing parents; relative to the working directory if relative).
      images: a random-access source of images (np.ndarray, list of arrays, `dn2_jax.data.FolderImages`, any
        object with len and [int]), streamed to embed_fn in batches by `dn2_jax.pipeline.batches` (read
        ahead by worker threads; at most a few batches in host memory). An image that fails to read (e.g. a
        file that does not decode) stops the extraction with its error, naming it; the committed chunks stay.
      embed_fn: uint8 images (B, H, W[, C]) → (B, D) features (numpy or jax array); every batch holds one
        image shape (a batch is cut where the shape changes: order rows by shape, see
        `dn2_jax.pipeline.order_by_shape`). Must be deterministic for a resumed store to equal an
        uninterrupted one.
      metadata: JSON data with at least backbone, fingerprint, preset, dataset, split.
      labels, ids: (N,) integers; default -1 and arange(N).
      indices: (N,) row r of the store is ``images[indices[r]]`` (default: every image, in order).
      chunk_size: images per committed chunk (at most this many are lost by a crash).
      batch_size: images per embed_fn call (chunks are split into batches).
      dtype: "float32" or "bfloat16", as stored.
      progress: show a tqdm bar counting images.
      lock_timeout: seconds to wait for another writer of `path` (default: env DN2_LOCK_TIMEOUT, else no limit).
      threads, prefetch: reader threads and batches read ahead (`dn2_jax.pipeline.batches`).

    Returns:
      The complete store. If `path` already holds a complete store for the same data, it is returned as is.

    Raises:
      DN2Error: bad arguments, or `path` holds something else (another store: the message names both sides),
        or another writer held the lock past `lock_timeout`.
      DN2FileError: `path` cannot be written (checked before embedding anything).
    """
    path = fileio.absolute(path)
    indices = _row_indices(len(images), indices)
    count = len(indices)
    _validate_extraction(count, chunk_size, batch_size, dtype)
    labels, ids = _index_arrays(count, labels, ids)
    manifest = _new_manifest(metadata, count, chunk_size, dtype, labels, ids)
    if (done := _complete_same(path, manifest)) is not None:  # No lock needed, nothing written: may be read-only.
        return done
    check_store_path(path)
    stream = {"threads": threads, "prefetch": prefetch}
    with _locked(path, lock_timeout):
        return _extract_locked(path, images, indices, embed_fn, manifest, labels, ids, batch_size, progress, stream)


def write_store(
    path: str | os.PathLike,
    embeddings: Any,
    *,
    metadata: Mapping[str, Any],
    labels: Any = None,
    ids: Any = None,
    chunk_size: int = 65536,
    overwrite: bool = False,
    lock_timeout: float | None = None,
) -> EmbeddingStore:
    """Writes (N, D) embeddings already in memory (float32 or bfloat16, kept) as a store, in the same format.

    The store is built in a sibling temporary directory and renamed into place, holding the writer lock. An
    existing store for the same data (same `_identity`: metadata, labels, ids, chunk_size, dtype) is returned
    as is, so two processes publishing the same store both succeed; any other existing `path` is an error
    unless `overwrite`.
    """
    path = fileio.absolute(path)
    emb = np.asarray(embeddings)
    is_float = emb.dtype == DTYPES["bfloat16"] or np.issubdtype(emb.dtype, np.floating)
    if emb.ndim != 2 or emb.shape[0] == 0 or not is_float:
        raise DN2Error(f"embeddings must be a non-empty (N, D) float array, got shape {emb.shape} {emb.dtype}.")
    dtype = "bfloat16" if emb.dtype == DTYPES["bfloat16"] else "float32"
    _validate_extraction(len(emb), chunk_size, chunk_size, dtype)
    labels, ids = _index_arrays(len(emb), labels, ids)
    manifest = _new_manifest(metadata, len(emb), chunk_size, dtype, labels, ids)
    if not overwrite and (done := _complete_same(path, manifest)) is not None:
        return done
    check_store_path(path)
    with _locked(path, lock_timeout):
        if path.exists() and not overwrite:
            with contextlib.suppress(DN2Error):  # Published by another writer while this one waited.
                if (existing := _complete_same(path, manifest)) is not None:
                    return existing
            raise DN2Error(f"'{path}' already exists; pass overwrite=True to replace it.")
        for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # Left by a killed writer.
            shutil.rmtree(old, ignore_errors=True)
        tmp = fileio.temporary_dir(path)
        try:
            _extract_locked(tmp, emb, np.arange(len(emb)), lambda x: x, manifest, labels, ids, chunk_size, False, {})
            fileio.publish_dir(tmp, path, overwrite=overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path)


def save_threshold(
    path: str | os.PathLike, *, value: float, k: int, fpr: float, lock_timeout: float | None = None, **extra: Any
) -> EmbeddingStore:
    """Records a decision threshold (score units: mean squared distance to the k nearest) in a complete store.

    The manifest is replaced atomically, holding the store's writer lock; `extra` (JSON data) is kept alongside
    value, k and fpr.
    """
    path = fileio.absolute(path)
    manifest_file = open_store(path).manifest_file
    if not (isinstance(k, int) and k >= 1):
        raise DN2Error(f"k must be a positive int, got {k!r}.")
    if not (math.isfinite(value) and 0.0 <= fpr <= 1.0):
        raise DN2Error(f"threshold value must be finite and fpr in [0, 1], got value={value!r}, fpr={fpr!r}.")
    threshold = {**extra, "value": float(value), "k": k, "fpr": float(fpr)}
    try:
        json.dumps(threshold, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DN2Error(f"threshold extras must be JSON data: {e}.") from e
    fileio.check_writable(path / manifest_file, "file", what="the store's manifest")
    with fileio.writer_lock(path, timeout=lock_timeout):
        store = open_store(path)  # Again, under the lock: another writer may have replaced it.
        fileio.atomic_write_json(store.path / store.manifest_file, {**store._manifest, "threshold": threshold})
    return open_store(path)


# ----------------------------------------------------------------------------------------------------------
# Multi-part stores: one part per process of a jax.distributed job.
#
#   parts.json          the manifest of the whole (metadata, count, sha256 of all labels and ids), written by
#                       process 0 once every part is complete; its chunks are the parts' chunks
#   part-0-of-2/        process 0's share of the rows: a normal (resumable) store
#   part-1-of-2/        process 1's share, the rows after process 0's
#
# open_store reads one as a single store: rows in global order (part 0's, then part 1's, ...).


def part_name(index: int, count: int) -> str:
    """The folder of process `index`'s part of a store written by `count` processes."""
    return f"part-{index}-of-{count}"


_PART = re.compile(r"part-(\d+)-of-(\d+)")


def _part_counts(path: Path) -> set[int]:
    """The process counts of the part folders in `path` (empty: none, or not a folder)."""
    if not path.is_dir():
        return set()
    return {int(m.group(2)) for p in path.iterdir() if (m := _PART.fullmatch(p.name)) and p.is_dir()}


def _is_parts_dir(path: Path) -> bool:
    """Whether `path` holds a multi-part store (complete or not; its parts' writer locks while they are written)
    or only a killed writer's temporaries."""
    return all(fileio.is_temporary(p.name) or p.name == PARTS or _PART.fullmatch(p.name.removeprefix(".")
               .removesuffix(".lock")) for p in path.iterdir())


class PartedStore(EmbeddingStore):
    """A complete multi-part store (one part per process of the job that wrote it), read as one store: ids,
    labels and embeddings are the parts' in process order. `parts` are the parts as stores."""

    manifest_file = PARTS

    def __init__(self, path: Path, manifest: dict[str, Any], parts: list[EmbeddingStore]):
        super().__init__(path, manifest)
        self.parts = parts

    def _load_index(self) -> dict[str, np.ndarray]:
        if self._index is None:
            index = {k: np.concatenate([getattr(p, k) for p in self.parts]) for k in ("labels", "ids")}
            if {k: _sha256(v) for k, v in index.items()} != self._manifest["index_sha256"]:
                raise DN2FileError(f"the parts of embedding store '{self.path}' do not hold the rows its {PARTS} "
                                   "lists (sha256 of labels/ids differs). Re-create the store.")
            self._index = index
        return self._index

    def iter_chunks(self, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        offset = 0
        for part in self.parts:
            for start, emb in part.iter_chunks(dtype):
                yield offset + start, emb
            offset += part.count


def _open_parts(path: Path, expect: Mapping[str, Any] | None, verify: bool) -> PartedStore:
    if not (path / PARTS).is_file():
        counts = sorted(_part_counts(path))
        raise IncompleteStoreError(
            f"embedding store '{path}' is incomplete: its parts were being written by {counts[0]} processes "
            f"({', '.join(f'part-*-of-{c}' for c in counts)}). Run the same command on {counts[0]} processes to "
            "resume it.")
    try:
        manifest = json.loads((path / PARTS).read_text())
        names, meta = manifest["parts"], manifest["metadata"]
        if manifest.get("format") != FORMAT or not isinstance(names, list) or not isinstance(meta, dict):
            raise ValueError("not a multi-part store manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DN2FileError(f"the manifest '{path / PARTS}' is damaged: {e}.") from e
    parts = [open_store(path / name) for name in names]
    if sum(p.count for p in parts) != meta.get("count") or {p.dim for p in parts} != {meta.get("dim")}:
        raise DN2FileError(f"the parts of embedding store '{path}' do not add up to its {PARTS} (count "
                           f"{meta.get('count')}, dim {meta.get('dim')}). Re-create the store.")
    return _checked(PartedStore(path, manifest, parts), expect, verify)


def _complete_store_same(path: Path, manifest: Mapping[str, Any]) -> EmbeddingStore | None:
    """The complete store at `path` (one part or several) if it holds the data `manifest` describes."""
    if (path / PARTS).is_file():
        theirs = _identity(_open_parts(path, None, False)._manifest)
        mine = _identity(manifest)
        return None if _differences(theirs, mine, sorted(set(mine) | set(theirs)), "") else open_store(path)
    return _complete_same(path, manifest)


def _check_resumable(path: Path, manifest: Mapping[str, Any], processes: int) -> None:
    """Refuses, before any work, a store at `path` that `processes` processes cannot write: one of other data,
    or one begun by another number of processes."""
    if (path / PARTS).is_file() or ((path / MANIFEST).is_file() and processes > 1):
        existing = _open_parts(path, None, False)._manifest if (path / PARTS).is_file() else _read_manifest(path)
        mine, theirs = _identity(manifest), _identity(existing)
        if diffs := _differences(theirs, mine, sorted(set(mine) | set(theirs)), "this run has"):
            raise DN2Error(f"'{path}' already holds an embedding store for other data or another model: {diffs}. "
                           "Use another path, or delete it to re-embed.")
        raise DN2Error(f"embedding store '{path}' was begun by 1 process and is incomplete; resume it with 1 "
                       f"process (this run has {processes}), or delete it to start again.")
    if others := sorted(_part_counts(path) - {processes if processes > 1 else -1}):
        raise DN2Error(f"embedding store '{path}' was begun by {others[0]} processes ({part_name(0, others[0])}, "
                       f"...) and is incomplete; resume it with {others[0]} processes (this run has {processes}), "
                       "or delete it to start again.")


def extract_parts(
    path: str | os.PathLike,
    images: Sequence[Any] | np.ndarray,
    embed_fn: Callable[[np.ndarray], Any],
    *,
    metadata: Mapping[str, Any],
    labels: Any = None,
    ids: Any = None,
    indices: Any = None,
    chunk_size: int = 4096,
    batch_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
    lock_timeout: float | None = None,
    threads: int | None = None,
    prefetch: int | None = None,
) -> EmbeddingStore:
    """`extract_to_store` over every process of a jax.distributed job (call it in all of them, with the same
    arguments): process p embeds its share of `images` (`dn2_jax.distributed.share_bounds`) into its own part,
    ``path/part-<p>-of-<P>/`` (a normal resumable store), and process 0 writes ``path/parts.json`` once every part
    is complete. Returns the whole store on every process (`open_store`: rows in the global order).

    A single process writes a normal store (`extract_to_store`). A complete store for the same data is
    returned as is, whichever number of processes wrote it.

    Raises:
      DN2Error: as `extract_to_store`; also an incomplete store begun by another number of processes (resume it
        with that number), or fewer images than processes.
    """
    from dn2_jax import distributed

    path = fileio.absolute(path)
    indices = np.arange(len(images), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    count = len(indices)
    _validate_extraction(count, chunk_size, batch_size, dtype)
    labels, ids = _index_arrays(count, labels, ids)
    manifest = _new_manifest(metadata, count, chunk_size, dtype, labels, ids)
    if (done := _complete_store_same(path, manifest)) is not None:
        return done
    n_proc, me = distributed.process_count(), distributed.process_index()
    check_store_path(path)
    _check_resumable(path, manifest, n_proc)
    if n_proc == 1:
        return extract_to_store(path, images, embed_fn, metadata=metadata, labels=labels, ids=ids,
                                indices=indices, chunk_size=chunk_size, batch_size=batch_size, dtype=dtype,
                                progress=progress, lock_timeout=lock_timeout, threads=threads, prefetch=prefetch)
    if count < n_proc:
        raise DN2Error(f"{count} images cannot be shared by {n_proc} processes; run fewer processes.")
    a, b = distributed.share_bounds(count)
    extract_to_store(path / part_name(me, n_proc), images, embed_fn, metadata=metadata, labels=labels[a:b],
                     ids=ids[a:b], indices=indices[a:b], chunk_size=chunk_size, batch_size=batch_size, dtype=dtype,
                     progress=progress, lock_timeout=lock_timeout, threads=threads, prefetch=prefetch)
    distributed.barrier("dn2-store-parts-written")
    if distributed.is_writer():
        names = [part_name(p, n_proc) for p in range(n_proc)]
        dims = {open_store(path / name).dim for name in names}
        if len(dims) != 1:
            raise DN2FileError(f"the parts of '{path}' have different dims {sorted(dims)}; re-create the store.")
        whole = {**manifest, "complete": True, "parts": names, "metadata": {**manifest["metadata"], "dim": dims.pop()}}
        fileio.atomic_write_json(path / PARTS, whole)
    distributed.barrier("dn2-store-parts-committed")
    return open_store(path)
