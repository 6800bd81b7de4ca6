"""Features of dataset subsets, extracted once and cached in embedding stores (resumable, any image sizes).

Images of different sizes (image folders) are ordered by shape before extraction (from the file headers,
`dn2_jax.pipeline.order_by_shape`), so each backbone batch holds one shape (one compilation per shape) and an
interrupted store resumes like any other: the store's ids record each row's index in the dataset. Images are
streamed from the dataset's source (`dn2_jax.pipeline`), never all decoded at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax.data import Dataset, Images, take
from dn2_jax.errors import DN2Error
from dn2_jax.evaluation.config import PIXELS
from dn2_jax.pipeline import order_by_shape


class FeatureExtractor:
    """Embeds images, and subsets of a dataset split cached in embedding stores, exactly as `detector` does.

    Args:
      detector: a `dn2_jax.detector.Detector` (fitted or not): its jitted embedding function and feature
        identity (backbone, weights fingerprint, preset) are used, so cached features are the deployed ones.
      cache_dir: a folder of embedding stores reused across runs; None = no caching.

    Attributes: `identity` (what a store's metadata must match), `detector`.
    """

    def __init__(self, detector, cache_dir: str | os.PathLike | None = None):
        cfg = detector.config
        self.detector = detector
        self.backbone, self.dtype, self.batch_size = cfg.backbone, cfg.dtype, cfg.batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.identity = detector.identity  # loads the backbone once

    @classmethod
    def from_config(cls, cfg, cache_dir: str | os.PathLike | None = None) -> FeatureExtractor:
        """From an `EvalConfig` (its detector settings)."""
        from dn2_jax.detector import Detector

        return cls(Detector(cfg.detector_config()), cache_dir)

    def embed(self, images: Images) -> np.ndarray:
        """(N, D) float32 raw features of N uint8 images: an (N, H, W[, C]) array, or a list (any sizes)."""
        return self.detector.embed(images, raw=True)

    def metadata(self, ds: Dataset, **extra) -> dict[str, Any]:
        """Store metadata for features of `ds` made by this extractor. For datasets of image files it holds a
        fingerprint of the files (paths, sizes, modification times): a store's ids are indices into them, so a
        file added, removed, changed or skipped (undecodable) gives another cache entry."""
        meta = {**self.identity, "dataset": ds.name, "split": ds.split, "compute_dtype": self.dtype}
        if ds.paths is not None:
            meta["files"] = _files_fingerprint(ds.paths)
        return {**meta, **extra}

    def to_store(self, path: str | os.PathLike, ds: Dataset, indices: np.ndarray, *, chunk_size: int = 4096,
                 metadata: Mapping[str, Any] | None = None, parts: bool = False):
        """Embeds ``ds.images[indices]`` into a resumable store at `path` (ids = the dataset indices); returns it.

        Rows are ordered by image shape (one shape per batch), so the store's ids give each row's image. The
        images are streamed (`dn2_jax.pipeline.batches`): decoded in reader threads a few batches ahead, never
        all in memory.
        With `parts`, every process of a multi-process job embeds its share into its part of the store
        (`dn2_jax.store.extract_parts`; call it in all processes).
        """
        from dn2_jax import store

        indices = np.asarray(indices, np.int64)
        if len(indices) == 0:
            raise DN2Error(f"no images to embed from {ds.name} ({ds.split})")
        meta = dict(metadata) if metadata is not None else self.metadata(ds)
        order = order_by_shape(ds.images, indices)
        extract = store.extract_parts if parts else store.extract_to_store
        return extract(Path(path).absolute(), ds.images, self.embed, metadata=meta, labels=ds.labels[order],
                       ids=order, indices=order, chunk_size=chunk_size,
                       batch_size=self.batch_size)

    def __call__(self, ds: Dataset, indices: np.ndarray) -> np.ndarray:
        """(len(indices), D) float32 raw features of ``ds.images[indices]``, in that order (cached if configured)."""
        indices = np.asarray(indices, np.int64)
        if self.cache_dir is None or self.backbone == PIXELS or len(indices) == 0:
            return self.embed(take(ds.images, indices))
        from dn2_jax import store

        meta = self.metadata(ds)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{ds.name}-{ds.split}-{self.backbone}")
        folder = self.cache_dir / f"{safe}-{key}"
        # Any complete store of the same images/backbone/preset that holds every requested image will do.
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith("."):  # a writer's lock file or temporary directory
                continue
            try:
                st = store.open_store(path, expect=meta)
            except store.IncompleteStoreError:
                continue  # resumed below if it is the one this request needs
            pos = _positions(st.ids, indices)
            if pos is not None:
                return st.embeddings()[pos]
        path = folder / hashlib.sha256(indices.tobytes()).hexdigest()[:16]
        st = self.to_store(path, ds, indices, chunk_size=4096, metadata=meta)
        return st.embeddings()[_positions(st.ids, indices)]


def _files_fingerprint(paths: list[str]) -> str:
    """sha256 (hex, 16 digits) of each file's path, size and modification time, in order."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """Positions of `wanted` in `ids`, or None if some are missing."""
    if len(ids) == 0:
        return None
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    found = order[pos]
    return found if np.array_equal(ids[found], wanted) else None


def embed_split(path: str | os.PathLike, config, dataset: str, split: str, *, data_dir: str | None = None,
                class_: int | None = None, chunk_size: int = 4096, on_error: str = "raise"):
    """Embeds a dataset split (only class `class_` if given) into a resumable store at `path` with the
    features of a detector with `config` (a `DetectorConfig`); returns the store (what `dn2 embed` does).
    on_error: "raise" (stop at the first undecodable image file, naming it) or "skip" (leave such files out,
    see `dn2_jax.data.load_dataset`; the store's metadata lists them under "skipped"). In a multi-process job
    each process embeds its share into its part of the store (`dn2_jax.store.extract_parts`)."""
    from dn2_jax.data import load_dataset
    from dn2_jax.detector import Detector

    ds = load_dataset(dataset, split, data_dir, on_error=on_error)
    idx = np.arange(len(ds))
    if class_ is not None:
        if not 0 <= class_ < len(ds.class_names):
            raise DN2Error(f"--class {class_} does not exist: {dataset} has classes 0..{len(ds.class_names) - 1}")
        idx = np.flatnonzero(ds.labels == class_)
    extract = FeatureExtractor(Detector(config))
    meta = extract.metadata(ds, **{"class": class_, "input_size": config.input_size},
                            skipped=[{"path": path, "reason": reason} for path, reason in ds.skipped])
    return extract.to_store(path, ds, idx, chunk_size=chunk_size, metadata=meta, parts=True)
