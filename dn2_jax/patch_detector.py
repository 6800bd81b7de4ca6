"""The patch-level detector: `Detector(level="patch")` (SPADE / PatchCore style, `dn2_jax.patch`).

    det = Detector(level="patch", layers=("stage3", "stage5"), coreset=0.1, k=1)
    det.fit(train_images)                      # patch bank: greedy k-center coreset of the training patches
    det.score(test_images)                     # (M,) image scores (Euclidean feature units), higher = worse
    q, res = det.query_maps(test_images)       # Query + PatchResult (patch scores, anomaly maps)
    det.save("bottle.dn2"); Detector.load("bottle.dn2")

Fitting: every training image's patch features (grid x grid rows of D dims, `dn2_jax.patch.PatchFn`) are
computed batch by batch, optionally into an embedding store (``patch_store``: one row of grid*grid*D values
per image, chunked and resumable); the bank is `dn2_jax.patch.coreset_rows` of the N*grid*grid patch rows
(all of them in memory when they fit in ``MEMORY_BYTES``, else `dn2_jax.coreset.coreset_select_stream` over
the store's chunks). Each bank row remembers the training image it came from.

Calibration (threshold, p-values): each training image is scored against the bank without its own patches
(leave one image out), reduced to an image score like any test image; the threshold is the (1 - fpr) quantile.

Saved like an image-level detector (one directory): ``bank/`` holds the (K, D) bank rows with ids = the
index of the training image of each row, ``calibration/`` the (N, 1) leave-one-image-out scores, and
detector.json the training image names (``image_paths``), ``images`` (N) and ``grid``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dn2_jax.coreset import coreset_select_stream
from dn2_jax.data import Dataset
from dn2_jax.detector import MANIFEST, Detector, DetectorConfig, Query, _check_paths
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.knn import knn, squared_norms
from dn2_jax.patch import PatchResult, anomaly_maps, coreset_rows, image_scores, patchcore_scores
from dn2_jax.preprocessing import check_images

#: Training patch features up to this size are selected in memory (exactly `dn2_jax.patch.build_bank`);
#: larger banks are streamed from the patch store.
MEMORY_BYTES = 2 << 30
#: Bytes of patch features per committed chunk of a patch store.
CHUNK_BYTES = 64 << 20
#: Patch rows per kNN call when scoring (bounds the (rows, k) neighbour arrays).
QUERY_ROWS = 16384


class _PatchFeatures:
    """The patch pipeline of a level-'patch' config: identity and images -> (B, grid, grid, D) features."""

    def __init__(self, cfg: DetectorConfig):
        import jax.numpy as jnp

        from dn2_jax.convert import load_variables
        from dn2_jax.models import fingerprint, get_backbone
        from dn2_jax.patch import make_patch_fn

        spec = get_backbone(cfg.backbone)
        variables = load_variables(cfg.backbone, cfg.weights)
        pcfg = cfg.patch_config()
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        fn = make_patch_fn(spec, variables, pcfg, batch_size=cfg.batch_size, dtype=dtype)
        patch = {"layers": list(fn.layers), "pool": pcfg.pool, "grid": fn.grid, "proj_dim": pcfg.proj_dim,
                 "seed": pcfg.seed}
        self.identity = {
            "backbone": cfg.backbone,
            "fingerprint": fingerprint(variables),
            "preset": json.dumps(dataclasses.asdict(fn.preset), sort_keys=True),
            "patch": json.dumps(patch, sort_keys=True),
        }
        self.embed_fn = fn
        self.feature_dim = fn.feature_dim


class PatchDetector(Detector):
    """A `Detector` whose bank holds patches (built by ``Detector(level="patch", ...)``; see the module doc).

    Scores are image scores from patch scores (root mean squared distance of each patch to its k nearest bank
    patches, Euclidean feature units; reduced by the config's `reduce`). `neighbours` / `Query.neighbours` are
    the training images of the k bank patches nearest to each image's most anomalous patch. Inputs: uint8
    images (N, H, W[, C]), a list of such images (any sizes) or a `Dataset`; stores of image features and
    (N, D) features do not apply.
    """

    def __init__(self, config: DetectorConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        if self.config.level != "patch":
            raise DN2Error("PatchDetector needs level='patch'")
        self._pcfg = self.config.patch_config()
        self._image_paths: list[str] | None = None
        self._images = 0

    # ------------------------------------------------------------------------------------------ features

    def _pipe(self) -> Any:
        if self._pipeline is None:
            self._pipeline = _PatchFeatures(self.config)
        return self._pipeline

    @property
    def patch_fn(self) -> Any:
        """The jitted `dn2_jax.patch.PatchFn`: uint8 images (B, H, W[, C]) -> (B, grid, grid, D) float32."""
        return self._pipe().embed_fn

    def share_features(self, other: PatchDetector) -> PatchDetector:
        """Uses `other`'s patch function (its loaded backbone and compiled code); the configs must be equal.
        Returns self."""
        if not isinstance(other, PatchDetector) or other.config != self.config:
            raise DN2Error("share_features needs a patch-level detector with the same config")
        self._pipeline = other._pipe()
        return self

    @property
    def images(self) -> int:
        """Training images the bank was built from."""
        self._fitted()
        return self._images

    @property
    def image_paths(self) -> list[str] | None:
        """Names of the training images (None if fitted without)."""
        self._fitted()
        return None if self._image_paths is None else list(self._image_paths)

    @property
    def bank_paths(self) -> list[str] | None:
        """The training image name of each bank patch, or None."""
        self._fitted()
        return None if self._image_paths is None else [self._image_paths[i] for i in self._ids]

    def embed(self, images: Any, *, raw: bool = False) -> np.ndarray:
        """(N, grid, grid, D) float32 patch features of uint8 images (array, list of one size or Dataset)."""
        images = self.check_images(images)[0]
        if not isinstance(images, np.ndarray):
            images = np.stack(images) if len({im.shape for im in images}) == 1 else None
            if images is None:
                raise DN2Error("embed needs images of one size at level 'patch'; score mixed sizes with score()")
        return self.patch_fn(images)

    def check_images(self, x: Any, paths: Any = None) -> tuple[Any, list[str] | None]:
        """(images: a uint8 array or list of arrays, paths) of `x` (images, a list or a Dataset), validated
        before any work: non-empty, uint8, each image at least as large as the patch grid (else DN2Error naming
        the first image too small, by its path where given)."""
        if isinstance(x, Dataset):
            paths = list(x.paths) if paths is None and x.paths is not None else paths
            x = x.images
        if isinstance(x, (str, bytes, os.PathLike)) or type(x).__name__ == "EmbeddingStore":
            raise DN2Error("a patch-level detector needs the images themselves, not an embedding store of image "
                           "features")
        if isinstance(x, np.ndarray):
            if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
                raise DN2Error("(N, D) features do not apply at level 'patch': pass uint8 images")
            check_images(x)
            shapes = [x.shape[1:3]] if len(x) else []
        elif isinstance(x, Sequence):
            for i, image in enumerate(x):
                if not isinstance(image, np.ndarray):
                    raise DN2Error(f"images[{i}] must be a numpy array, got {type(image).__name__}")
                check_images(image[None], what=f"images[{i}]")
            shapes = [im.shape[:2] for im in x]
        else:
            raise DN2Error(f"images must be a uint8 array, a list of uint8 arrays or a Dataset, got "
                           f"{type(x).__name__}")
        if len(x) == 0:
            raise DN2Error("images is empty: nothing to score")
        grid = self.patch_fn.grid
        small = [i for i, (h, w) in enumerate(shapes) if min(h, w) < grid]
        if small:
            i = small[0]
            name = paths[i] if paths is not None and i < len(paths) else f"image {i}"
            h, w = shapes[i] if len(shapes) > 1 else shapes[0]
            raise DN2Error(f"{name} is {w}x{h} px, smaller than the patch grid ({grid}x{grid} patches); "
                           f"{len(small)} image(s) are too small")
        return x, paths

    def _chunks(self, images: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image indices, (b, grid, grid, D) patch features) over `images`, a few batches at a time, grouped by
        image shape (one compilation per shape)."""
        fn = self.patch_fn
        step = 4 * fn.batch_size
        if isinstance(images, np.ndarray):
            groups = [np.arange(len(images))]
        else:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, image in enumerate(images):
                by_shape.setdefault(image.shape, []).append(i)
            groups = [np.asarray(g) for g in by_shape.values()]
        for idx in groups:
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                batch = images[part] if isinstance(images, np.ndarray) else np.stack([images[i] for i in part])
                yield part, fn(batch)

    # ------------------------------------------------------------------------------------------ fitting

    def fit(self, x: Any, *, paths: Sequence[str] | None = None, ids: Any = None,
            patch_store: str | os.PathLike | None = None) -> PatchDetector:
        """Builds the patch bank of normal images `x` and calibrates it (leave one image out). `paths`: N image
        names (default: a Dataset's). `patch_store`: an embedding store path for the training patch features
        (one row per image; resumed if interrupted; needs images of one size), else they stay in memory.
        Returns self."""
        if ids is not None:
            raise DN2Error("ids do not apply at level 'patch' (bank patches are named by their image); pass paths")
        images, paths = self.check_images(x, paths)
        n = len(images)
        paths = None if paths is None else _check_paths(paths, n)
        if n < 2:
            raise DN2Error(f"a patch-level detector needs at least 2 normal images (leave-one-image-out "
                           f"calibration), got {n}")
        fn = self.patch_fn
        per_image, dim = fn.grid * fn.grid, fn.feature_dim
        if patch_store is not None:
            chunks = self._store_chunks(images, patch_store)
        else:
            patches = np.empty((n, fn.grid, fn.grid, dim), np.float32)
            for idx, feats in self._chunks(images):
                patches[idx] = feats

            def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                yield np.arange(n), patches
        if patch_store is None or n * per_image * dim * 4 <= MEMORY_BYTES:
            flat = (patches if patch_store is None else np.concatenate([c for _, c in chunks()])).reshape(-1, dim)
            rows = coreset_rows(flat, self._pcfg)
            bank = flat[rows]
            del flat
        else:
            if self._pcfg.coreset is None or self._pcfg.coreset >= 1.0:
                raise DN2Error(f"{n * per_image} patches of {dim} dims do not fit in memory: choose a coreset "
                               "fraction below 1")
            rows = coreset_select_stream((c.reshape(-1, dim) for _, c in chunks()), self._pcfg.coreset,
                                         seed=self._pcfg.seed, proj_dim=self._pcfg.coreset_proj_dim)
            bank = _gather_rows(chunks(), rows, per_image, dim)
        owners = (rows // per_image).astype(np.int64)
        owned = np.bincount(owners, minlength=n)
        if len(bank) - owned.max() < self.k:
            raise DN2Error(f"k={self.k}: the bank has {len(bank)} patches, {owned.max()} of them from one "
                           "image; leave-one-image-out calibration needs k from the others: raise coreset or lower "
                           "k")
        self._install_patch(bank, owners, paths, n, None)
        cal = np.empty(n, np.float32)
        for idx, feats in chunks():
            cal[idx] = self._loo_scores(feats, owners[None], idx)
        self._calibration = cal
        self._sorted_calibration = np.sort(cal)
        return self

    def _store_chunks(self, images: Any, path: str | os.PathLike) -> Callable[[], Iterator]:
        from dn2_jax import store

        if not isinstance(images, np.ndarray):
            if len({im.shape for im in images}) > 1:
                raise DN2Error("a patch store needs images of one size; these mix sizes (fit without a store)")
            images = np.stack(images)
        fn = self.patch_fn
        row = fn.grid * fn.grid * fn.feature_dim
        meta = {**self._pipe().identity, "dataset": "patches", "split": "train", "compute_dtype": self.config.dtype,
                "grid": fn.grid, "patch_dim": fn.feature_dim}
        st = store.extract_to_store(path, images, lambda b: fn(b).reshape(len(b), -1), metadata=meta,
                                    chunk_size=max(1, CHUNK_BYTES // (4 * row)), batch_size=fn.batch_size,
                                    progress=False)
        shape = (fn.grid, fn.grid, fn.feature_dim)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start, emb in st.iter_chunks():
                yield np.arange(start, start + len(emb)), emb.reshape(len(emb), *shape)

        return chunks

    def _loo_scores(self, patches: np.ndarray, owners: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        """Image scores of training images `image_ids` with patches (b, g, g, D) against the bank without the
        patches of the same image (the k nearest among the others: k + the most rows one image owns are
        searched, the image's own dropped). PatchCore's re-weighting uses the whole bank."""
        b, g, _, dim = patches.shape
        k = self.k
        extra = int(np.bincount(owners[0]).max())
        kk = min(k + extra, len(owners[0]))
        q = patches.reshape(-1, dim)
        q_owner = np.repeat(image_ids, g * g)
        scores = np.empty(len(q), np.float32)
        bank, norms = self._bank_device
        step = max(1, QUERY_ROWS * 8 // kk)
        for s in range(0, len(q), step):
            d, i = knn(q[s : s + step], bank, kk, bank_sq_norms=norms)
            d, i = np.asarray(d, np.float32), np.asarray(i)
            d = np.where(owners[0][i] == q_owner[s : s + step, None], np.inf, d)
            d = np.sort(d, axis=1)[:, :k]
            scores[s : s + step] = np.sqrt(np.maximum(d.mean(axis=1), 0.0))
        return self._reduce(patches, scores.reshape(b, g, g))

    def _reduce(self, patches: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self._pcfg.reduce == "patchcore":
            return patchcore_scores(patches, scores, self._features, self._pcfg.reweight_b)
        return image_scores(scores, self._pcfg.reduce, self._pcfg.topk)

    def _install_patch(self, bank: np.ndarray, owners: np.ndarray, paths: list[str] | None, n_images: int,
                       calibration: np.ndarray | None) -> None:
        import jax.numpy as jnp

        dev = jnp.asarray(bank)
        self._features, self._ids, self._paths = np.asarray(bank, np.float32), owners, None
        self._kept = np.arange(len(bank), dtype=np.int64)
        self._image_paths, self._images = paths, int(n_images)
        self._bank_device = (dev, squared_norms(dev))
        if calibration is not None:
            self._calibration = np.asarray(calibration, np.float32)
            self._sorted_calibration = np.sort(self._calibration)

    def add(self, x: Any, **kwargs: Any) -> Detector:
        raise DN2Error("add is not available at level 'patch'; fit the bank again on all normal images")

    def fit_features(self, features: Any, **kwargs: Any) -> Detector:
        raise DN2Error("fit_features does not apply at level 'patch'; fit images")

    add_features = add

    def score_features(self, features: Any) -> np.ndarray:
        raise DN2Error("score_features does not apply at level 'patch'; score images")

    def query_features(self, features: Any, k: int | None = None) -> Query:
        raise DN2Error("query_features does not apply at level 'patch'; query images")

    # ------------------------------------------------------------------------------------------ scoring

    def query_maps(self, images: Any, k: int | None = None, *,
                   on_maps: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
                   ) -> tuple[Query, PatchResult]:
        """One pass over `images`: (`Query` (image scores, p-values, decisions, the training images of the k
        bank patches nearest to each image's worst patch), `PatchResult` (image scores, patch scores (M, g, g),
        anomaly maps (M, crop, crop) in the model's input frame)). With `on_maps(indices, maps, image scores)`
        the maps of each chunk of images go there instead (PatchResult.maps is then empty (0, crop, crop)), so memory
        holds one chunk of maps."""
        k = self._check_k(k)
        images, _ = self.check_images(images)
        m, g, crop = len(images), self.patch_fn.grid, self.patch_fn.preset.crop
        bank, norms = self._bank_device
        img = np.empty(m, np.float32)
        pscores = np.empty((m, g, g), np.float32)
        maps = np.empty((0 if on_maps else m, crop, crop), np.float32)
        nb_d, nb_i = np.empty((m, k), np.float32), np.empty((m, k), np.int64)
        for idx, patches in self._chunks(images):
            s = np.empty(patches.shape[:3], np.float32).reshape(-1)
            q = patches.reshape(-1, patches.shape[-1])
            for a in range(0, len(q), QUERY_ROWS):
                d, _ = knn(q[a : a + QUERY_ROWS], bank, self.k, bank_sq_norms=norms)
                s[a : a + QUERY_ROWS] = np.sqrt(np.maximum(np.asarray(d, np.float32).mean(axis=1), 0.0))
            s = s.reshape(patches.shape[:3])
            pscores[idx], img[idx] = s, self._reduce(patches, s)
            worst = q.reshape(len(idx), -1, q.shape[-1])[np.arange(len(idx)), s.reshape(len(idx), -1).argmax(1)]
            d, i = knn(worst, bank, k, bank_sq_norms=norms)
            nb_d[idx], nb_i[idx] = np.asarray(d, np.float32), np.asarray(i, np.int64)
            chunk_maps = anomaly_maps(s, crop, self._pcfg.sigma)
            if on_maps is not None:
                on_maps(idx, chunk_maps, img[idx])
            else:
                maps[idx] = chunk_maps
        owners = self._ids[nb_i]
        labels = owners if self._image_paths is None else np.asarray(self._image_paths, dtype=str)[owners]
        query = Query(scores=img, p_values=self._p_values(img), anomalous=img > np.float32(self.threshold),
                      neighbours=labels, neighbour_sq_dists=nb_d)
        return query, PatchResult(img, pscores, maps)

    def query(self, images: Any, k: int | None = None) -> Query:
        """Scores, p-values, decisions and the k nearest training images (by the worst patch) of `images`."""
        return self.query_maps(images, k, on_maps=lambda *chunk: None)[0]

    def score(self, images: Any) -> np.ndarray:
        """(M,) float32 image scores (Euclidean feature units), higher = more anomalous."""
        return self.query(images).scores

    def maps(self, images: Any) -> PatchResult:
        """`dn2_jax.patch.PatchResult` of `images`: image scores, patch scores and anomaly maps."""
        return self.query_maps(images)[1]

    def neighbours(self, images: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(training image labels (M, k), squared distances (M, k)) of the k bank patches nearest to each
        image's most anomalous patch."""
        q = self.query(images, k)
        return q.neighbours, q.neighbour_sq_dists

    # ------------------------------------------------------------------------------------------ save / load

    def _saved_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        features, _ = self._fitted()
        return features, self._ids, np.arange(self._images, dtype=np.int64), {
            "bank_size": int(len(features)), "images": self._images, "image_paths": self._image_paths,
            "grid": int(self.patch_fn.grid)}

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> PatchDetector:
        """A saved patch-level detector; `overrides` may change `weights` (same fingerprint), `batch_size`,
        `fpr` and `sigma` (maps only)."""
        path = Path(path).absolute()
        det, manifest, features, owners, kept, calibration = cls._load_parts(
            path, overrides, ("weights", "batch_size", "fpr", "sigma"))
        n, paths = manifest.get("images"), manifest.get("image_paths")
        if (not isinstance(n, int) or len(features) != manifest["count"] or features.shape[1] != manifest["dim"]
                or not np.array_equal(kept, np.arange(n)) or (paths is not None and len(paths) != n)
                or np.any(owners < 0) or np.any(owners >= n) or features.shape[1] != det.patch_fn.feature_dim):
            raise DN2FileError(f"detector '{path}' is damaged: its bank, calibration and {MANIFEST} disagree")
        det._install_patch(features, owners, paths, n, calibration)
        return det


def _gather_rows(chunks: Iterator[tuple[np.ndarray, np.ndarray]], rows: np.ndarray, per_image: int,
                 dim: int) -> np.ndarray:
    """Patch rows `rows` (of the N*g*g rows) from a stream of (image indices, (b, g, g, D)) chunks."""
    out = np.empty((len(rows), dim), np.float32)
    order = np.argsort(rows)
    sorted_rows = rows[order]
    for idx, feats in chunks:
        lo, hi = np.searchsorted(sorted_rows, [idx[0] * per_image, (idx[-1] + 1) * per_image])
        take = order[lo:hi]
        out[take] = feats.reshape(-1, dim)[rows[take] - idx[0] * per_image]
    return out


__all__ = ["PatchDetector"]


def map_names(names: Sequence[str]) -> list[str]:
    """PNG file names of `dn2 score --maps`, one per image name: ``<index>_<parent>_<stem>.png`` (an index
    keeps them unique and in input order; characters other than letters, digits, '-' and '.' become '_')."""
    width = max(4, len(str(len(names) - 1)))
    out = []
    for i, name in enumerate(names):
        p = Path(str(name))
        tail = f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem
        safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in tail)[-60:]
        out.append(f"{i:0{width}d}_{safe}.png")
    return out


def score_with_maps(det: PatchDetector, source: Any, out_dir: str | os.PathLike) -> Any:
    """`dn2_jax.scoring.score_source` for a patch-level detector that also writes one heat-map overlay PNG per
    image (`map_names`) into the new directory `out_dir`: the image in the model's input frame with its anomaly
    map on a colour scale fixed by the detector (0 to twice its threshold: the threshold is mid-scale), titled
    with the score. The PNGs are written to a temporary sibling and published together. Returns the report."""
    from dn2_jax import fileio
    from dn2_jax.patch import save_overlays, to_model_frame
    from dn2_jax.scoring import ScoreReport

    if not isinstance(det, PatchDetector):
        raise DN2Error("--maps needs a patch-level detector (dn2 fit --level patch)")
    if source.images is None:
        raise DN2Error("--maps needs the images themselves (--images or --dataset), not a store of features")
    out = fileio.check_writable(out_dir, "dir", overwrite=False, parents=True, what="--maps")
    images, _ = det.check_images(source.images)
    files = map_names(source.names)
    hi = 2.0 * det.threshold
    fileio.make_parents(out)
    tmp = fileio.temporary_dir(out)

    def write(idx: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> None:
        frames = np.stack([to_model_frame(np.asarray(images[i])[None], det.patch_fn.preset)[0] for i in idx])
        titles = [f"{_short(Path(str(source.names[i])).name)}: {s:.3g}" for i, s in zip(idx, scores, strict=True)]
        save_overlays(frames, maps, [tmp / files[i] for i in idx], vmin=0.0, vmax=hi, titles=titles)

    try:
        query, _ = det.query_maps(images, on_maps=write)
        if out.is_dir():
            out.rmdir()  # empty (check_writable), replaced by the finished folder
        fileio.publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ScoreReport(list(source.names), query, det.k, det.config.fpr, det.threshold, source)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def fit_patch_detector(config: DetectorConfig, source: Any, out: str | os.PathLike, *,
                       overwrite: bool = False) -> PatchDetector:
    """`dn2 fit --level patch`: a patch-level detector fitted to a `dn2_jax.scoring.Source` (names kept as the
    training image paths, absolute for files) and saved to `out`. The training patch features go to a hidden
    store beside `out` (``.<name>.patches``): a killed fit resumes from it, and it is removed once `out` is
    written (images of mixed sizes are kept in memory instead)."""
    from dn2_jax.scoring import check_new_output

    check_new_output(out, "--out", overwrite=overwrite)
    out = Path(out).absolute()
    det = Detector(config)
    names = [os.path.abspath(n) if os.path.isfile(n) else n for n in source.names]
    images, _ = det.check_images(source.images, names)
    store = out.parent / f".{out.name}.patches" if isinstance(images, np.ndarray) else None
    det.fit(images, paths=names, patch_store=store)
    det.save(out, overwrite=overwrite)
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)
    return det
