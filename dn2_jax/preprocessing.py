"""On-device preprocessing: uint8 images → resized, centre-cropped, normalised float32, per-backbone presets.

The resize is `jax.image.resize(..., method="linear", antialias=True)`: a triangle (bilinear) filter whose
support is widened by the scale factor when downsampling, with half-pixel centres. That is the filter PIL's
`Image.resize(..., BILINEAR)` uses, and what torchvision's `Resize(antialias=True)` reproduces, so results
match the torchvision pipeline up to rounding: PIL rounds the resized image back to uint8, we keep floats.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.errors import DN2Error


@dataclasses.dataclass(frozen=True)
class Preset:
    """Resize the short side to `resize` px, centre-crop `crop`×`crop`, then `(x - mean) / std` per channel.

    `mean` and `std` are RGB triples in uint8 units (0..255).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise DN2Error(f"preset needs 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")

    def at_size(self, size: int) -> Preset:
        """The same preset at input (crop) size `size`, keeping the resize/crop ratio."""
        if size < 1:
            raise DN2Error(f"input_size must be a positive number of pixels, got {size}")
        return dataclasses.replace(self, resize=max(size, round(size * self.resize / self.crop)), crop=size)


def _scaled(values: tuple[float, ...]) -> tuple[float, float, float]:
    return tuple(255.0 * v for v in values)


def _lite(crop: int) -> Preset:
    return Preset(resize=round(crop / 0.875), crop=crop, mean=(127.0,) * 3, std=(128.0,) * 3)


PRESETS: dict[str, Preset] = {
    # torchvision ResNets: Resize(256) → CenterCrop(224) → Normalize(ImageNet mean/std).
    "imagenet": Preset(256, 224, _scaled((0.485, 0.456, 0.406)), _scaled((0.229, 0.224, 0.225))),
    "efficientnet_lite0": _lite(224),
    "efficientnet_lite1": _lite(240),
    "efficientnet_lite2": _lite(260),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; raises `DN2Error` listing the known names."""
    if name not in PRESETS:
        raise DN2Error(f"unknown preprocessing preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def check_images(images, what: str = "images") -> None:
    """Raises `DN2Error` unless `images` is a non-empty uint8 batch of an unambiguous shape.

    Accepted: (N, H, W) grayscale, or (N, H, W, C) with C in {1, 3}. A rank-3 array whose last axis is 1, 3
    or 4 is refused as ambiguous: (32, 32, 3) is far more likely one RGB image than 32 grayscale images
    3 pixels wide, so it is not guessed either way; pass `images[None]` for one image, or add a channel
    axis, (N, H, W, 1), for grayscale images that narrow. A rank-2 array (one grayscale image) is refused
    the same way.
    """
    shape, dtype = tuple(np.shape(images)), getattr(images, "dtype", None)
    if dtype != np.uint8:
        raise DN2Error(f"{what} must be uint8 (0..255), got dtype {dtype}")
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4)):
        raise DN2Error(
            f"{what} has shape {shape}, which looks like a single image (H, W[, C]) rather than a batch "
            f"(N, H, W) or (N, H, W, C): pass {what}[None] for a batch of one image, or shape (N, H, W, 1) "
            f"for grayscale images {shape[-1]} pixels wide"
        )
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise DN2Error(
            f"{what} must have shape (N, H, W) (grayscale) or (N, H, W, C) with C = 1 or 3, got {shape}"
        )
    if shape[0] == 0:
        raise DN2Error(f"{what} is empty (shape {shape}): there is nothing to embed")
    if min(shape[1:3]) < 1:
        raise DN2Error(f"{what} must have at least one pixel, got shape {shape}")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)`: the short side becomes `size`, the long side `int(size * long / short)`."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _centre_crop(x: jax.Array, crop: int) -> jax.Array:
    """torchvision `CenterCrop`: offsets `int(round((side - crop) / 2))`; x is (N, H, W, C), sides ≥ crop."""
    top = int(round((x.shape[1] - crop) / 2.0))
    left = int(round((x.shape[2] - crop) / 2.0))
    return x[:, top : top + crop, left : left + crop, :]


def preprocess(images: jax.Array | np.ndarray, preset: Preset) -> jax.Array:
    """uint8 (N, H, W) or (N, H, W, C∈{1,3}) → normalised float32 (N, crop, crop, 3). Jit-able.

    Shapes are checked by `check_images` (ambiguous rank-3 shapes and empty batches are refused).

    Grayscale is replicated to RGB; then short-side resize (antialiased bilinear), centre crop, normalisation.
    """
    check_images(images)
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    x = jnp.broadcast_to(x, x.shape[:3] + (3,)).astype(jnp.float32)
    n, h, w, _ = x.shape
    height, width = resized_shape(h, w, preset.resize)
    if (height, width) != (h, w):
        x = jax.image.resize(x, (n, height, width, 3), method="linear", antialias=True)
    x = _centre_crop(x, preset.crop)
    mean = jnp.asarray(preset.mean, jnp.float32)
    std = jnp.asarray(preset.std, jnp.float32)
    return (x - mean) / std
