"""Patch-level kNN (SPADE / PatchCore style): where in the image is the defect.

Pipeline: images → patch features (named intermediate layers of a backbone, each locally averaged over a
``pool``×``pool`` neighbourhood, resampled to a common ``grid``×``grid`` and concatenated, optionally randomly
projected) → a patch bank of the training images (optionally a greedy k-center coreset, `dn2_jax.coreset`) →
each test patch's distance to its nearest bank patches (the blocked exact kNN of `dn2_jax.knn`, nothing quadratic
in memory) → an image score (max, top-k mean or PatchCore's re-weighted max) and an anomaly map upsampled to the
model's input frame with Gaussian smoothing.

Frame: maps live in the model's input frame (after the backbone preset's short-side resize and centre crop,
``crop``×``crop`` pixels); `to_model_frame` maps images and ground-truth masks into the same frame.
Feature extraction reuses `dn2_jax.embedding.EmbedFn` (jitted, data-parallel, padded batches) with a patch
forward in place of the pooled one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from dn2_jax.coreset import coreset_select, random_projection
from dn2_jax.embedding import EmbedFn
from dn2_jax.errors import DN2Error
from dn2_jax.knn import knn
from dn2_jax.models import BackboneSpec, get_backbone
from dn2_jax.preprocessing import Preset, check_images, preprocess
from dn2_jax.sharding import data_mesh

Array = jax.Array

#: Default patch layers per backbone family (chosen on a validation set of `dn2_jax.synthetic`, seed 1).
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {"efficientnet": ("stage3", "stage5"), "resnet": ("stage2", "stage3")}
REDUCTIONS = ("max", "topk_mean", "patchcore")


def default_layers(spec: BackboneSpec | str) -> tuple[str, ...]:
    """The default patch layers of a backbone (mid-level stages, strides 8-16)."""
    name = get_backbone(spec).name
    for family, layers in DEFAULT_LAYERS.items():
        if name.startswith(family):
            return layers
    raise DN2Error(f"no default patch layers for backbone {name}; pass layers=...")


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """Settings of patch-level scoring.

    layers: backbone feature names (None: `default_layers`). pool: local averaging window (odd, 1 = none).
    grid: patch grid side (None: the largest chosen layer's). proj_dim: random projection of the concatenated
    features (None: none). coreset: kept fraction of the training patches in (0, 1] (None: keep all).
    coreset_proj_dim: projection used for the coreset's distances only. k: nearest bank patches per test patch.
    reduce: image score from patch scores: 'max', 'topk_mean' (mean of the ``topk`` largest) or 'patchcore'
    (max re-weighted by the bank neighbourhood, ``reweight_b`` neighbours). sigma: Gaussian smoothing of the
    upsampled map, in input pixels (0: none). input_size: model input side (None: the backbone preset's).
    seed: seeds the projections and the coreset start.
    """

    layers: tuple[str, ...] | None = None
    pool: int = 3
    grid: int | None = None
    proj_dim: int | None = None
    coreset: float | None = 0.1
    coreset_proj_dim: int | None = 128
    k: int = 1
    reduce: str = "max"
    topk: int = 10
    reweight_b: int = 9
    sigma: float = 4.0
    input_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.pool < 1 or self.pool % 2 == 0:
            raise DN2Error(f"pool must be a positive odd window size, got {self.pool}")
        if self.grid is not None and self.grid < 1:
            raise DN2Error(f"grid must be a positive number of patches, got {self.grid}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise DN2Error(f"proj_dim must be positive, got {self.proj_dim}")
        if self.coreset is not None and not 0.0 < self.coreset <= 1.0:
            raise DN2Error(f"coreset fraction must be in (0, 1], got {self.coreset}")
        if self.k < 1 or self.topk < 1 or self.reweight_b < 1:
            raise DN2Error(f"k, topk and reweight_b must be positive, got {self.k}, {self.topk}, {self.reweight_b}")
        if self.reduce not in REDUCTIONS:
            raise DN2Error(f"reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")
        if self.sigma < 0:
            raise DN2Error(f"sigma must be >= 0 pixels, got {self.sigma}")


# ----------------------------------------------------------------------------------------------------------
# Features.


def aggregate_patches(maps: Sequence[Array], *, pool: int = 3, grid: int, proj: Array | None = None) -> Array:
    """Stage feature maps [(B, h_i, w_i, c_i)] → patch features (B, grid, grid, D) float32. Jit-able.

    Each map is averaged over a ``pool``×``pool`` neighbourhood (stride 1, SAME, padding not counted), resampled
    to grid×grid (bilinear, antialiased when shrinking) and the maps are concatenated (D = Σ c_i), then
    multiplied by ``proj`` (Σ c_i, D') if given.
    """
    out = []
    for m in maps:
        m = m.astype(jnp.float32)
        if pool > 1:
            m = nn.avg_pool(m, (pool, pool), strides=(1, 1), padding="SAME", count_include_pad=False)
        if m.shape[1:3] != (grid, grid):
            m = jax.image.resize(m, (m.shape[0], grid, grid, m.shape[3]), method="linear", antialias=True)
        out.append(m)
    x = jnp.concatenate(out, axis=-1)
    if proj is not None:
        x = jnp.dot(x, proj, precision=lax.Precision.HIGHEST)
    return x


def _patch_forward(variables: Any, images: Array, *, module: Any, preset: Preset, layers: tuple[str, ...],
                   pool: int, grid: int, proj: np.ndarray | None) -> Array:
    feats = module.apply(variables, preprocess(images, preset))
    return aggregate_patches([feats[name] for name in layers], pool=pool, grid=grid,
                             proj=None if proj is None else jnp.asarray(proj))


class PatchFn(EmbedFn):
    """`fn(images uint8 (B, H, W[, C])) -> np.ndarray float32 (B, grid, grid, D)` for any B, run in batches.

    The batching, padding, sharding and prefetch are `EmbedFn`'s; only the jitted forward differs.
    Attributes: `grid`, `feature_dim` D, `layers`, `layer_shapes` {name: (h, w, c)}, `preset`, `batch_size`.
    """

    def __init__(self, spec: BackboneSpec, variables: Any, *, layers: Sequence[str] | None = None, pool: int = 3,
                 grid: int | None = None, proj_dim: int | None = None, seed: int = 0, batch_size: int = 32,
                 dtype: Any = jnp.float32, mesh: Mesh | None = None, input_size: int | None = None):
        mesh = data_mesh(jax.local_devices()) if mesh is None else mesh
        preset = spec.preset if input_size is None else spec.preset.at_size(input_size)
        layers = tuple(default_layers(spec) if layers is None else layers)
        if not layers:
            raise DN2Error("layers must name at least one feature map")
        module = spec.module(dtype=dtype)
        crop = preset.crop
        probe = jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.uint8)
        shapes = jax.eval_shape(lambda v, x: module.apply(v, preprocess(x, preset)), variables, probe)
        spatial = {k: v.shape[1:] for k, v in shapes.items() if len(v.shape) == 4}
        unknown = [name for name in layers if name not in spatial]
        if unknown:
            raise DN2Error(f"unknown patch layer(s) {', '.join(unknown)} for backbone {spec.name}; "
                           f"available: {', '.join(spatial)}")
        largest = max(spatial[name][0] for name in layers)
        self.grid = largest if grid is None else int(grid)
        if crop < self.grid:
            raise DN2Error(f"the input ({crop}x{crop} px after preprocessing) is smaller than the patch grid "
                           f"({self.grid}x{self.grid}); use a larger input_size or a smaller grid")
        dim = sum(spatial[name][2] for name in layers)
        proj = None if proj_dim is None else random_projection(dim, proj_dim, seed)
        self.layers, self.layer_shapes = layers, {name: spatial[name] for name in layers}
        forward = functools.partial(_patch_forward, module=module, preset=preset, layers=layers, pool=pool,
                                    grid=self.grid, proj=proj)
        super().__init__(spec, variables, batch_size=batch_size, dtype=dtype, mesh=mesh, feature="pooled",
                         preset=preset, forward=forward)


def make_patch_fn(spec: BackboneSpec | str, variables: Any, config: PatchConfig = PatchConfig(), *,
                  batch_size: int = 32, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> PatchFn:
    """A jitted, data-parallel `images uint8 (B, H, W[, C]) -> patch features float32 (B, grid, grid, D)`.

    Raises `DN2Error` for unknown layer names (listing the available ones) and for inputs smaller than the grid.
    """
    return PatchFn(get_backbone(spec), variables, layers=config.layers, pool=config.pool, grid=config.grid,
                   proj_dim=config.proj_dim, seed=config.seed, batch_size=batch_size, dtype=dtype, mesh=mesh,
                   input_size=config.input_size)


# ----------------------------------------------------------------------------------------------------------
# Bank and scores.


def coreset_rows(flat: np.ndarray, config: PatchConfig = PatchConfig()) -> np.ndarray:
    """Rows int64 (K,) of (M, D) training patch features that form the bank: all of them, or the greedy
    coreset of ``config.coreset`` of them (distances on a ``coreset_proj_dim`` projection), in selection order."""
    if config.coreset is None or config.coreset >= 1.0:
        return np.arange(len(flat), dtype=np.int64)
    return coreset_select(flat, config.coreset, seed=config.seed, proj_dim=config.coreset_proj_dim)


def build_bank(patches: np.ndarray, config: PatchConfig = PatchConfig()) -> np.ndarray:
    """Training patch features (N, g, g, D) or (M, D) → the patch bank (K, D) float32 (`coreset_rows`)."""
    flat = np.asarray(patches, np.float32).reshape(-1, np.shape(patches)[-1])
    if config.coreset is None or config.coreset >= 1.0:
        return flat
    return flat[coreset_rows(flat, config)]


def write_patches(images: np.ndarray, fn: PatchFn, path: str | os.PathLike) -> np.memmap:
    """Patch features of images uint8 (N, H, W[, C]) written batch by batch to a ``.npy`` of shape
    (N * grid * grid, D) float32 (RSS: one batch), e.g. for `dn2_jax.coreset.coreset_select_stream`. The images
    are validated and ``path`` must not exist, both before anything is written. Returns the file, memory-mapped
    read-only."""
    images = np.asarray(images)
    check_images(images)
    if os.path.exists(path):
        raise DN2Error(f"patch bank file {path} already exists")
    per_image = fn.grid * fn.grid
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(len(images) * per_image, fn.feature_dim))
    starts = range(0, len(images), fn.batch_size)
    row = 0
    for feats in fn.stream(images[s : s + fn.batch_size] for s in starts):
        flat = feats.reshape(-1, fn.feature_dim)
        out[row : row + len(flat)] = flat
        row += len(flat)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def fit_patch_bank(images: np.ndarray, spec: BackboneSpec | str, variables: Any,
                   config: PatchConfig = PatchConfig(), *, batch_size: int = 32) -> np.ndarray:
    """Patch bank (K, D) float32 of normal training images uint8 (N, H, W[, C]): `make_patch_fn` + `build_bank`."""
    return build_bank(make_patch_fn(spec, variables, config, batch_size=batch_size)(images), config)


def patch_scores(patches: Array, bank: Array, k: int = 1, **knn_kwargs) -> np.ndarray:
    """(N, g, g, D) test patch features → (N, g, g) float32 scores: root of the mean squared distance to the k
    nearest bank patches (Euclidean feature units; k = 1: the nearest-neighbour distance)."""
    shape = np.shape(patches)
    if len(shape) != 4:
        raise DN2Error(f"patches must be (N, g, g, D), got shape {shape}")
    d, _ = knn(jnp.asarray(patches).reshape(-1, shape[-1]), bank, k, **knn_kwargs)
    return np.sqrt(np.asarray(jnp.mean(d, axis=1))).reshape(shape[:3])


def image_scores(scores: Array, reduce: str = "max", topk: int = 10) -> np.ndarray:
    """(N, g, g) patch scores → (N,) image scores: 'max' or 'topk_mean' (mean of the ``topk`` largest)."""
    flat = np.asarray(scores, np.float32).reshape(len(scores), -1)
    if reduce == "max":
        return flat.max(axis=1)
    if reduce == "topk_mean":
        t = min(topk, flat.shape[1])
        return np.sort(flat, axis=1)[:, -t:].mean(axis=1)
    raise DN2Error(f"reduce must be 'max' or 'topk_mean' here ('patchcore' needs the features: "
                   f"patchcore_scores), got {reduce!r}")


def patchcore_scores(patches: Array, scores: Array, bank: Array, b: int = 9) -> np.ndarray:
    """PatchCore's re-weighted image score (Roth et al. 2022, eq. 7): s = w · max patch score, with
    w = 1 - exp(d(m, m*)) / Σ_{n ∈ N_b(m*)} exp(d(m, n)), m the most anomalous test patch, m* its nearest bank
    patch and N_b(m*) the b nearest bank patches of m* (m* included). Shapes: (N, g, g, D), (N, g, g) → (N,)."""
    shape = np.shape(patches)
    flat = np.asarray(scores, np.float32).reshape(len(scores), -1)
    worst = np.asarray(patches, np.float32).reshape(shape[0], -1, shape[-1])[np.arange(shape[0]), flat.argmax(1)]
    bank = jnp.asarray(bank, jnp.float32)
    b = min(b, bank.shape[0])
    _, star = knn(worst, bank, 1)
    _, hood = knn(bank[star[:, 0]], bank, b)  # (N, b): m*'s neighbourhood, m* itself first
    d = np.linalg.norm(worst[:, None, :] - np.asarray(bank)[np.asarray(hood)], axis=-1)  # (N, b)
    d = d - d.min(axis=1, keepdims=True)  # shift for a stable softmax; the weight is unchanged
    w = 1.0 - np.exp(d[:, 0]) / np.exp(d).sum(axis=1)
    return (w * flat.max(axis=1)).astype(np.float32)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("size", "sigma"))
def _maps(scores: Array, size: int, sigma: float) -> Array:
    x = jax.image.resize(scores.astype(jnp.float32), (scores.shape[0], size, size), method="linear")
    if sigma <= 0:
        return x
    g = jnp.asarray(_gaussian_kernel(sigma))
    r = (g.shape[0] - 1) // 2
    x = jnp.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")[:, :, :, None]  # (N, H + 2r, W + 2r, 1)
    dims = ("NHWC", "HWIO", "NHWC")
    x = lax.conv_general_dilated(x, g.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dims,
                                 precision=lax.Precision.HIGHEST)
    x = lax.conv_general_dilated(x, g.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dims,
                                 precision=lax.Precision.HIGHEST)
    return x[..., 0]


def anomaly_maps(scores: Array, size: int, sigma: float = 4.0) -> np.ndarray:
    """(N, g, g) patch scores → (N, size, size) float32 maps: bilinear upsampling to size×size (the model
    input frame) then a separable Gaussian of ``sigma`` pixels (reflect padding; 0 = none). Jitted."""
    if np.ndim(scores) != 3:
        raise DN2Error(f"scores must be (N, g, g), got shape {np.shape(scores)}")
    if size < 1:
        raise DN2Error(f"size must be positive, got {size}")
    if sigma > 0 and 4 * sigma >= size:
        raise DN2Error(f"sigma ({sigma} px) is too large for {size}x{size} maps")
    return np.asarray(_maps(jnp.asarray(scores), int(size), float(sigma)))


def to_model_frame(images: np.ndarray, preset: Preset, *, masks: bool = False) -> np.ndarray:
    """Images uint8 (N, H, W[, C]) → uint8 (N, crop, crop, 3) in the model's input frame (the preset's resize
    and centre crop, no normalisation); with ``masks=True``, (N, H, W) masks (nonzero = defect) → bool (N, crop,
    crop), resized bilinearly and thresholded at one half."""
    plain = dataclasses.replace(preset, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if masks:
        m = (np.asarray(images) > 0).astype(np.uint8) * 255
        return np.asarray(preprocess(m, plain))[..., 0] >= 127.5
    return np.clip(np.rint(np.asarray(preprocess(images, plain))), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PatchResult:
    """Scores of test images: `image_scores` (N,), `patch_scores` (N, g, g), `maps` (N, crop, crop) in the
    model's input frame (feature units)."""

    image_scores: np.ndarray
    patch_scores: np.ndarray
    maps: np.ndarray


def score_patch_images(images: np.ndarray, bank: np.ndarray, spec: BackboneSpec | str, variables: Any,
                       config: PatchConfig = PatchConfig(), *, batch_size: int = 32,
                       patch_fn: PatchFn | None = None) -> PatchResult:
    """Test images uint8 (N, H, W[, C]) against a bank from `fit_patch_bank` (same config) → `PatchResult`."""
    fn = patch_fn or make_patch_fn(spec, variables, config, batch_size=batch_size)
    if np.shape(bank)[-1] != fn.feature_dim:
        raise DN2Error(f"bank has {np.shape(bank)[-1]} dims but this config's patches have {fn.feature_dim}")
    patches = fn(images)
    scores = patch_scores(patches, bank, config.k)
    if config.reduce == "patchcore":
        img = patchcore_scores(patches, scores, bank, config.reweight_b)
    else:
        img = image_scores(scores, config.reduce, config.topk)
    return PatchResult(img, scores, anomaly_maps(scores, fn.preset.crop, config.sigma))


def save_overlays(images: np.ndarray, maps: np.ndarray, paths: Sequence[str | os.PathLike], *,
                  vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5,
                  titles: Sequence[str] | None = None) -> None:
    """One PNG per image: the image (uint8 (N, H, W[, 3]) in the maps' frame) with its map (N, H, W) as a 'jet'
    heat map on top. ``vmin``/``vmax`` fix the colour scale (default: over all maps), so PNGs compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, maps = np.asarray(images), np.asarray(maps)
    if len(images) != len(maps) or len(paths) != len(maps) or images.shape[1:3] != maps.shape[1:3]:
        raise DN2Error(f"images {images.shape}, maps {maps.shape} and {len(paths)} paths do not match")
    lo = float(maps.min()) if vmin is None else vmin
    hi = float(maps.max()) if vmax is None else vmax
    for i, path in enumerate(paths):
        fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
        ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None)
        ax.imshow(maps[i], cmap="jet", alpha=alpha, vmin=lo, vmax=hi)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)


def maps_figure(frame: np.ndarray, maps: np.ndarray, names: Sequence[str], scores: np.ndarray,
                masks: np.ndarray | None = None, *, per_kind: int = 2):
    """A matplotlib figure of anomaly maps: up to ``per_kind`` images of each kind in ``names`` (e.g. 'good' and
    each defect type), one column each: the image (uint8 (N, S, S[, 3]) in the maps' frame) titled with its
    score, the ground-truth mask (bool (N, S, S), if given) and the map (N, S, S) over the image, on one colour
    scale (1st percentile to max of all maps). Returns the figure (save it with `evaluation.save_figure`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(names))
    picks = [i for kind in kinds for i in [j for j, n in enumerate(names) if n == kind][:per_kind]]
    lo, hi = float(np.percentile(maps, 1)), float(np.max(maps))
    rows = 2 if masks is None else 3
    fig, axes = plt.subplots(rows, len(picks), figsize=(2.2 * len(picks), 2.2 * rows), squeeze=False)
    for c, i in enumerate(picks):
        gray = "gray" if frame[i].ndim == 2 else None
        axes[0, c].imshow(frame[i], cmap=gray)
        axes[0, c].set_title(f"{names[i]} (score {scores[i]:.3g})", fontsize=8)
        if masks is not None:
            axes[1, c].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[-1, c].imshow(frame[i], cmap=gray)
        axes[-1, c].imshow(maps[i], cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        for a in axes[:, c]:
            a.set_axis_off()
    if masks is not None:
        axes[1, 0].set_title("ground truth", fontsize=8, loc="left")
    axes[-1, 0].set_title("anomaly map", fontsize=8, loc="left")
    fig.tight_layout()
    return fig
