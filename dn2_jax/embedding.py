"""Feature extraction: uint8 images → (N, D) float32 backbone features, jitted and data-parallel.

Each batch is sharded over a 1-D device mesh (axis 'data'), the variables are replicated, and preprocessing
runs on device inside the same `jax.jit` as the model.

Compilation: one `EmbedFn` (one jitted function) is cached per (backbone spec, variables object, preset,
dtype, batch size, mesh, feature) and reused by every `embed` / `make_embed_fn` call with those settings,
so embedding many subsets compiles the backbone once per input shape, not once per call. Batches are
padded to a fixed size: a call with at least `batch_size` images pads its last batch to `batch_size` (no
recompilation after the first batch of a shape). A call with fewer images reuses the smallest size
already compiled for that image shape that fits, and otherwise pads to the next power of two (times the
device count), so a first one-image call does not pay for a full batch: at most 1 + log2(batch_size)
compiled sizes per image shape, and none after a full batch of that shape. The variables are identified
by object identity (the cache holds a reference, so the identity cannot be reused): JAX variables are
immutable by convention; after changing weights in place, call `clear_embed_cache()`.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from dn2_jax.errors import DN2Error
from dn2_jax.models import BackboneSpec, get_backbone
from dn2_jax.preprocessing import Preset, check_images, preprocess
from dn2_jax.sharding import DATA_AXIS, data_mesh

Images = np.ndarray | Sequence[np.ndarray]


def _forward(variables: Any, images: jax.Array, *, module: Any, preset: Preset, feature: str) -> jax.Array:
    """uint8 (B, H, W, C) → float32 (B, D); spatial features (B, h, w, c) are global-average-pooled."""
    feats = module.apply(variables, preprocess(images, preset))
    if feature not in feats:
        raise DN2Error(f"feature {feature!r} is not produced by this backbone; available: {', '.join(feats)}")
    x = feats[feature].astype(jnp.float32)
    return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """(N, H, W) grayscale → (N, H, W, 1) view, so both layouts share one compiled function."""
    return images[..., None] if images.ndim == 3 else images


class EmbedFn:
    """`fn(images uint8 (B, H, W[, C])) -> np.ndarray float32 (B, D)` for any B ≥ 1, run in batches.

    Attributes: `batch_size` (a multiple of the device count), `feature_dim` D, `preset`, `mesh`.
    Build it with `make_embed_fn` (cached); see the module docstring for the padding rule.

    `forward(variables, images uint8 (B, H, W, C)) -> (B, ...)` replaces the pooled-feature forward pass when
    given (e.g. `dn2_jax.patch.PatchFn`'s patch maps); the batching, padding, sharding and prefetch stay the same.
    """

    def __init__(self, spec: BackboneSpec, variables: Any, *, batch_size: int, dtype: Any, mesh: Mesh,
                 feature: str, preset: Preset, forward: Callable[[Any, jax.Array], jax.Array] | None = None):
        devices = mesh.shape[DATA_AXIS]
        self.mesh = mesh
        self.batch_size = -(-batch_size // devices) * devices
        self.preset = preset
        if forward is None:
            module, variables = spec.for_inference(variables)  # e.g. ResNet BatchNorm folded into the convs
            forward = functools.partial(_forward, module=module(dtype=dtype), preset=self.preset, feature=feature)
            known_dim = spec.feature_dim if feature == "pooled" else None
        else:
            known_dim = None
        if known_dim is not None:
            self.feature_dim = known_dim  # the spec's: no trace of the whole network just for its output shape
        else:
            probe = jax.ShapeDtypeStruct((1, self.preset.crop, self.preset.crop, 3), jnp.uint8)
            self.feature_dim = int(jax.eval_shape(forward, variables, probe).shape[-1])  # checks `feature`
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
        self._variables = jax.device_put(variables, replicated)
        self._sharded = sharded
        self._forward = jax.jit(forward, in_shardings=(replicated, sharded), out_shardings=sharded)
        self._compiled: dict[tuple[int, ...], set[int]] = {}  # image shape (H, W, C) -> padded batch sizes

    def padded_size(self, n: int, image_shape: tuple[int, ...] | None = None) -> int:
        """Rows a batch is padded to in a call embedding `n` images of shape `image_shape` (H, W, C):
        `batch_size` when n ≥ batch_size; else the smallest size already compiled for that shape that
        holds n; else the next power of two times the device count (capped at `batch_size`)."""
        if n >= self.batch_size:
            return self.batch_size
        done = [size for size in self._compiled.get(tuple(image_shape or ()), ()) if size >= n]
        if done:
            return min(done)
        devices = self.mesh.shape[DATA_AXIS]
        per_device = -(-n // devices)
        return min(devices * (1 << max(per_device - 1, 0).bit_length()), self.batch_size)

    def _dispatch(self, batch: np.ndarray, pad_to: int) -> tuple[int, jax.Array]:
        batch = _as_nhwc(batch)
        n = len(batch)
        if n < pad_to:
            pad = np.zeros((pad_to - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        self._compiled.setdefault(batch.shape[1:], set()).add(len(batch))
        # Place the batch explicitly: under jax.distributed a numpy input with a sharded in_sharding is refused.
        return n, self._forward(self._variables, jax.device_put(batch, self._sharded))

    def stream(self, batches: Iterable[np.ndarray], pad_to: int | None = None) -> Iterator[np.ndarray]:
        """Features of each batch (1..batch_size validated images), one batch in flight ahead of the host.

        Every batch is padded to `pad_to` rows (default `batch_size`; at most `batch_size`), so a stream of
        one image shape compiles once.
        """
        pad_to = self.batch_size if pad_to is None else min(int(pad_to), self.batch_size)
        pending = None
        for batch in batches:
            nxt = self._dispatch(batch, max(pad_to, len(batch)))
            if pending is not None:
                yield np.asarray(pending[1])[: pending[0]]  # slice on the host: no compile per size
            pending = nxt
        if pending is not None:
            yield np.asarray(pending[1])[: pending[0]]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        check_images(images)
        starts = range(0, len(images), self.batch_size)
        pad_to = self.padded_size(len(images), _as_nhwc(images).shape[1:])
        out = self.stream((images[s : s + self.batch_size] for s in starts), pad_to)
        return np.concatenate(list(out))


#: Cached embed functions, most recently used last (each holds a device copy of its variables).
_EMBED_FNS: collections.OrderedDict[tuple, tuple[Any, EmbedFn]] = collections.OrderedDict()
EMBED_CACHE_SIZE = 4


def clear_embed_cache() -> None:
    """Drops every cached embed function (and its device copy of the variables)."""
    _EMBED_FNS.clear()


def make_embed_fn(spec: BackboneSpec | str, variables: Any, *, batch_size: int = 64, dtype: Any = jnp.float32,
                  mesh: Mesh | None = None, feature: str = "pooled", input_size: int | None = None) -> EmbedFn:
    """A jitted, data-parallel `images uint8 (B, H, W[, C]) -> features float32 (B, D)`.

    The same settings (and the same `variables` object) return the same cached `EmbedFn`, whose compiled
    code is reused across calls; at most `EMBED_CACHE_SIZE` are kept (least recently used dropped).

    Args:
      spec: backbone spec or registry name.
      variables: Flax variables of the backbone (identified by object identity; do not mutate them).
      batch_size: images per step, rounded up to a multiple of the mesh's 'data' axis size.
      dtype: compute dtype, float32 or bfloat16 (features are always returned as float32).
      mesh: mesh with axis 'data' (default: all local devices).
      feature: key of the model's feature dict; spatial maps are global-average-pooled.
      input_size: crop size fed to the model (default: the preset's); the resize/crop ratio is kept.
    """
    spec = get_backbone(spec)
    if mesh is None:
        mesh = data_mesh(jax.local_devices())
    if DATA_AXIS not in mesh.axis_names:
        raise DN2Error(f"mesh must have an axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DN2Error(f"batch_size must be a positive integer, got {batch_size!r}")
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        raise DN2Error(f"dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}")
    preset = spec.preset if input_size is None else spec.preset.at_size(input_size)
    key = (spec, id(variables), preset, jnp.dtype(dtype).name, int(batch_size), mesh, feature)
    hit = _EMBED_FNS.get(key)
    if hit is not None and hit[0] is variables:
        _EMBED_FNS.move_to_end(key)
        return hit[1]
    fn = EmbedFn(spec, variables, batch_size=int(batch_size), dtype=dtype, mesh=mesh, feature=feature,
                 preset=preset)
    _EMBED_FNS[key] = (variables, fn)  # the reference keeps id(variables) from being reused
    while len(_EMBED_FNS) > EMBED_CACHE_SIZE:
        _EMBED_FNS.popitem(last=False)
    return fn


def _single_image(image: np.ndarray, what: str) -> np.ndarray:
    """One image of a sequence, (H, W) grayscale or (H, W, C), validated, as a (1, H, W, C) view."""
    if not isinstance(image, np.ndarray):
        raise DN2Error(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise DN2Error(f"{what} must be one image of shape (H, W) or (H, W, C), got {image.shape}")
    batch = image[None, ..., None] if image.ndim == 2 else image[None]
    check_images(batch, what=what)
    return batch


def _image_groups(images: Images) -> list[np.ndarray]:
    """Validates `images` and returns index arrays of same-shaped images, in order of first appearance."""
    if isinstance(images, np.ndarray):
        check_images(images)
        return [np.arange(len(images))]
    if len(images) == 0:
        raise DN2Error("images is empty: there is nothing to embed")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(_single_image(image, f"images[{i}]").shape, []).append(i)
    return [np.asarray(idx) for idx in groups.values()]


def embed(images: Images, spec: BackboneSpec | str, variables: Any, *, batch_size: int = 64,
          dtype: Any = jnp.float32, mesh: Mesh | None = None, progress: bool = True, feature: str = "pooled",
          input_size: int | None = None) -> np.ndarray:
    """Features (N, D) float32 of `images`, in input order.

    `images` is a non-empty uint8 batch (N, H, W) (grayscale) or (N, H, W, C) with C in {1, 3}, or a
    sequence of N uint8 images (H, W) or (H, W, C) of possibly different sizes (grouped by shape). A single
    image (H, W, 3) is refused (pass `images[None]`), as is any ambiguous rank-3 shape (see
    `check_images`). Everything is validated before any compute. The jitted function is cached across calls
    (see `make_embed_fn`): one compilation per image shape (and per small-call size bucket). Other arguments
    as in `make_embed_fn`; `progress` shows a tqdm bar with ETA.
    """
    groups = _image_groups(images)
    fn = make_embed_fn(spec, variables, batch_size=batch_size, dtype=dtype, mesh=mesh, feature=feature,
                       input_size=input_size)
    out = np.zeros((len(images), fn.feature_dim), np.float32)
    bs = fn.batch_size
    with tqdm(total=len(images), unit="img", desc="embedding", disable=not progress) as bar:
        for idx in groups:
            chunks = [idx[s : s + bs] for s in range(0, len(idx), bs)]
            if isinstance(images, np.ndarray):
                batches = (images[c[0] : c[-1] + 1] for c in chunks)
            else:
                batches = (np.concatenate([_single_image(images[i], "") for i in c]) for c in chunks)
            first = images[idx[0]][None] if isinstance(images, np.ndarray) else _single_image(images[idx[0]], "")
            pad_to = fn.padded_size(len(idx), _as_nhwc(first).shape[1:])
            for chunk, feats in zip(chunks, fn.stream(batches, pad_to), strict=True):
                out[chunk] = feats
                bar.update(len(chunk))
    return out
