"""Feature extraction: uint8 images → (N, D) float32 backbone features, jitted and data-parallel.

Each batch is sharded over a 1-D device mesh (axis 'data'), the variables are replicated, and preprocessing
runs on device inside the same `jax.jit` as the model. The batch size is a multiple of the device count and
the last batch is padded, so one input shape compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
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
    """uint8 (B, H, W[, C]) → float32 (B, D); spatial features (B, h, w, c) are global-average-pooled."""
    feats = module.apply(variables, preprocess(images, preset))
    if feature not in feats:
        raise DN2Error(f"feature {feature!r} is not produced by this backbone; available: {', '.join(feats)}")
    x = feats[feature].astype(jnp.float32)
    return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


class EmbedFn:
    """`fn(images uint8 (B, H, W[, C])) -> np.ndarray float32 (B, D)` for any B, run in batches.

    Attributes: `batch_size` (a multiple of the device count), `feature_dim` D, `preset`, `mesh`.
    """

    def __init__(self, spec: BackboneSpec, variables: Any, *, batch_size: int, dtype: Any, mesh: Mesh | None,
                 feature: str, input_size: int | None):
        if mesh is None:
            mesh = data_mesh(jax.local_devices())
        if DATA_AXIS not in mesh.axis_names:
            raise DN2Error(f"mesh must have an axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
        if batch_size < 1:
            raise DN2Error(f"batch_size must be positive, got {batch_size}")
        if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
            raise DN2Error(f"dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}")
        devices = mesh.shape[DATA_AXIS]
        self.mesh = mesh
        self.batch_size = -(-batch_size // devices) * devices
        self.preset = spec.preset if input_size is None else spec.preset.at_size(input_size)
        forward = functools.partial(_forward, module=spec.module(dtype=dtype), preset=self.preset,
                                    feature=feature)
        probe = jax.ShapeDtypeStruct((1, self.preset.crop, self.preset.crop, 3), jnp.uint8)
        self.feature_dim = int(jax.eval_shape(forward, variables, probe).shape[-1])  # checks `feature`
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
        self._variables = jax.device_put(variables, replicated)
        self._sharded = sharded
        self._forward = jax.jit(forward, in_shardings=(replicated, sharded), out_shardings=sharded)

    def _dispatch(self, batch: np.ndarray) -> tuple[int, jax.Array]:
        n = len(batch)
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        # Place the batch explicitly: under jax.distributed a numpy input with a sharded in_sharding is refused.
        return n, self._forward(self._variables, jax.device_put(batch, self._sharded))

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Features of each batch (≤ batch_size images, validated), one batch in flight ahead of the host."""
        pending = None
        for batch in batches:
            nxt = self._dispatch(batch)
            if pending is not None:
                yield np.asarray(pending[1][: pending[0]])
            pending = nxt
        if pending is not None:
            yield np.asarray(pending[1][: pending[0]])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        check_images(images)
        starts = range(0, len(images), self.batch_size)
        out = list(self.stream(images[s : s + self.batch_size] for s in starts))
        return np.concatenate(out) if out else np.zeros((0, self.feature_dim), np.float32)


def make_embed_fn(spec: BackboneSpec | str, variables: Any, *, batch_size: int = 64, dtype: Any = jnp.float32,
                  mesh: Mesh | None = None, feature: str = "pooled", input_size: int | None = None) -> EmbedFn:
    """A jitted, data-parallel `images uint8 (B, H, W[, C]) -> features float32 (B, D)`.

    Args:
      spec: backbone spec or registry name.
      variables: Flax variables of the backbone.
      batch_size: images per step, rounded up to a multiple of the mesh's 'data' axis size.
      dtype: compute dtype, float32 or bfloat16 (features are always returned as float32).
      mesh: mesh with axis 'data' (default: all local devices).
      feature: key of the model's feature dict; spatial maps are global-average-pooled.
      input_size: crop size fed to the model (default: the preset's); the resize/crop ratio is kept.
    """
    return EmbedFn(get_backbone(spec), variables, batch_size=batch_size, dtype=dtype, mesh=mesh,
                   feature=feature, input_size=input_size)


def _image_groups(images: Images) -> list[np.ndarray]:
    """Validates `images` and returns index arrays of same-shaped images, in order of first appearance."""
    if isinstance(images, np.ndarray):
        check_images(images)
        return [np.arange(len(images))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise DN2Error(f"images[{i}] must be a numpy array, got {type(image).__name__}")
        check_images(image[None], what=f"images[{i}]")
        groups.setdefault(image.shape, []).append(i)
    return [np.asarray(idx) for idx in groups.values()]


def embed(images: Images, spec: BackboneSpec | str, variables: Any, *, batch_size: int = 64,
          dtype: Any = jnp.float32, mesh: Mesh | None = None, progress: bool = True, feature: str = "pooled",
          input_size: int | None = None) -> np.ndarray:
    """Features (N, D) float32 of `images`, in input order.

    `images` is uint8 (N, H, W[, C]), or a sequence of N uint8 arrays (H, W[, C]) of possibly different
    sizes (grouped by shape, one compilation per shape). Everything is validated before any compute. Other
    arguments as in `make_embed_fn` (batch_size is capped at the largest group); `progress` shows a tqdm bar
    with ETA.
    """
    groups = _image_groups(images)
    largest = max((len(idx) for idx in groups), default=1)  # no padding beyond what the data needs
    fn = make_embed_fn(spec, variables, batch_size=min(batch_size, largest), dtype=dtype, mesh=mesh,
                       feature=feature, input_size=input_size)
    out = np.zeros((len(images), fn.feature_dim), np.float32)
    bs = fn.batch_size
    with tqdm(total=len(images), unit="img", desc="embedding", disable=not progress) as bar:
        for idx in groups:
            chunks = [idx[s : s + bs] for s in range(0, len(idx), bs)]
            if isinstance(images, np.ndarray):
                batches = (images[c[0] : c[-1] + 1] for c in chunks)
            else:
                batches = (np.stack([images[i] for i in c]) for c in chunks)
            for chunk, feats in zip(chunks, fn.stream(batches), strict=True):
                out[chunk] = feats
                bar.update(len(chunk))
    return out
