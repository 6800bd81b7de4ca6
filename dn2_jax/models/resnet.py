"""ResNet v1.5 in Flax, laid out exactly like torchvision's ``resnet18 .. resnet152``.

The stride of a bottleneck sits on its 3x3 conv (v1.5), every conv is padded symmetrically like PyTorch
(Flax's ``'SAME'`` pads stride-2 convs asymmetrically), BatchNorm runs in inference mode with eps 1e-5 and
the max-pool pads with -inf. Module names mirror torchvision's keys (``layer2.0.downsample.1`` is the Flax
module ``layer2_0/downsample_1``), so :func:`from_torchvision_state_dict` is a rename plus a transpose.

Inputs are NHWC float images normalised with the ImageNet mean/std; ``model.apply(variables, images)``
returns a dict of intermediate features.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dn2_jax.errors import DN2Error

ModuleDef = Any


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Output channels: ``planes``."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.planes, (3, 3), self.strides, padding=_pad(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), 1, padding=_pad(1), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        return nn.relu(y + _shortcut(self, x, y.shape[-1]))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (ResNet-50/101/152). Output channels: ``4 * planes``."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.planes, (1, 1), 1, padding=_pad(0), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), self.strides, padding=_pad(1), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.planes * self.expansion, (1, 1), 1, padding=_pad(0), name="conv3")(y)
        y = self.norm(name="bn3")(y)
        return nn.relu(y + _shortcut(self, x, y.shape[-1]))


def _shortcut(block: nn.Module, x: jax.Array, channels: int) -> jax.Array:
    """Identity, or torchvision's ``downsample`` (1x1 strided conv + BN) when the shape changes."""
    if block.strides == 1 and x.shape[-1] == channels:
        return x
    x = block.conv(channels, (1, 1), block.strides, padding=_pad(0), name="downsample_0")(x)
    return block.norm(name="downsample_1")(x)


class ResNet(nn.Module):
    """ResNet v1.5 (torchvision layout).

    ``__call__(x)`` takes normalised images ``(N, H, W, 3)`` and returns a dict:
      'stem'    (N, H/4, W/4, 64) after conv1/bn1/relu/maxpool,
      'stage1'..'stage4'  outputs of layer1..layer4 (strides 4, 8, 16, 32),
      'pooled'  (N, 512 * expansion) global average of 'stage4' -- the DN2 feature,
      'logits'  (N, num_classes).
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 1000
    dtype: Any = jnp.float32
    train: bool = False  # BatchNorm on batch statistics, updating 'batch_stats' (dn2_jax.adapt); else inference

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, epsilon=1e-5, dtype=self.dtype)
        out = {}
        x = conv(64, (7, 7), 2, padding=_pad(3), name="conv1")(x.astype(self.dtype))
        x = nn.relu(norm(name="bn1")(x))
        x = out["stem"] = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(1))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                block = self.block_cls(64 * 2**i, strides, conv=conv, norm=norm, name=f"layer{i + 1}_{j}")
                x = block(x)
            out[f"stage{i + 1}"] = x
        out["pooled"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(out["pooled"])
        return out


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)

RESNETS: dict[int, Callable[..., ResNet]] = {
    18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101, 152: ResNet152,
}


def _layout(depth: int) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, uses bottlenecks) of a depth."""
    kw = RESNETS[depth].keywords
    return tuple(kw["stage_sizes"]), kw["block_cls"] is Bottleneck


# Flax leaf (collection, name) -> torchvision leaf name, and how to turn the torch array into the Flax one.
_LEAVES: dict[tuple[str, str], str] = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _to_flax(array: np.ndarray) -> np.ndarray:
    """OIHW conv kernel -> HWIO, (out, in) dense kernel -> (in, out); vectors unchanged."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def _check_depth(depth: int) -> None:
    if depth not in RESNETS:
        raise DN2Error(f"depth: ResNet depth must be one of {sorted(RESNETS)}, got {depth!r}")


def torchvision_shapes(depth: int, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision state-dict key -> torch shape in ``resnet{depth}`` (without ``num_batches_tracked``)."""
    _check_depth(depth)
    return {key: shape for key, (_, shape) in _torchvision_table(depth, num_classes).items()}


@functools.cache
def _torchvision_table(depth: int, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torchvision key -> (Flax variable path, torch shape), derived from the Flax model's own shapes."""
    model = RESNETS[depth](num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    table = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        collection, *modules, name = path
        torch_key = ".".join(m.replace("_", ".") for m in modules) + "." + _LEAVES[collection, name]
        shape = leaf.shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = shape[::-1]
        table[torch_key] = (path, tuple(shape))
    return table


_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def _detect_depth(keys: Sequence[str]) -> tuple[int | None, str]:
    """The depth a torchvision ResNet state dict was made for (None: unknown) and a summary of its layout."""
    blocks: dict[int, set[int]] = {}
    for key in keys:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    counts = tuple(len(blocks[i]) for i in sorted(blocks))
    bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.", k) for k in keys)
    about = f"blocks per stage {list(counts)}, {'bottleneck' if bottleneck else 'basic'} blocks"
    for depth in RESNETS:
        if _layout(depth) == (counts, bottleneck):
            return depth, about
    return None, about


def from_torchvision_state_dict(
    state_dict: Mapping[str, np.ndarray], depth: int, num_classes: int = 1000
) -> dict[str, Any]:
    """Convert a torchvision ``resnet{depth}`` state dict (numpy) to Flax ``{'params', 'batch_stats'}``.

    Conv kernels go OIHW -> HWIO, the fc weight is transposed, ``num_batches_tracked`` is ignored. Raises
    DN2Error naming the problem: a checkpoint of another depth, missing or unexpected keys, wrong shapes.
    """
    _check_depth(depth)
    table = _torchvision_table(depth, num_classes)
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in table if k not in given]
    unexpected = [k for k in given if k not in table]
    if missing or unexpected:
        found, about = _detect_depth(list(given))
        if found is not None and found != depth:
            raise DN2Error(
                f"this looks like a resnet{found} checkpoint ({about}), not resnet{depth}; "
                f"pick the backbone resnet{found}"
            )
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        raise DN2Error(f"not a torchvision resnet{depth} state dict: {'; '.join(problems)}")
    flat = {}
    for key, (path, shape) in table.items():
        array = np.asarray(given[key])
        if array.shape != shape:
            raise DN2Error(
                f"wrong shape for {key} in the resnet{depth} state dict: expected {shape}, got {array.shape}"
            )
        flat[path] = _to_flax(array.astype(np.float32))
    return traverse_util.unflatten_dict(flat)
