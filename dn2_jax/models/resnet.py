"""ResNet v1.5 in Flax, laid out exactly like torchvision's ``resnet18 .. resnet152``.

The stride of a bottleneck sits on its 3x3 conv (v1.5), every conv is padded symmetrically like PyTorch
(Flax's ``'SAME'`` pads stride-2 convs asymmetrically), BatchNorm runs in inference mode with eps 1e-5 and
the max-pool pads with -inf. Module names mirror torchvision's keys (``layer2.0.downsample.1`` is the Flax
module ``layer2_0/downsample_1``), so :func:`torch_layout` is a rename plus a transpose; the conversion
itself is `dn2_jax.models.from_torch.from_torch_state_dict`, shared with EfficientNet-Lite.

Inputs are NHWC float images normalised with the ImageNet mean/std; ``model.apply(variables, images)``
returns a dict of intermediate features.

For inference the embedding path builds ``ResNet*(folded=True)`` with :func:`fold_batchnorm` ``(variables)``:
each BatchNorm merged into the conv before it, the same features to float32 rounding.
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
from dn2_jax.models import from_torch
from dn2_jax.models.from_torch import TorchLayout

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
    folded: bool = False  # convs with biases and no BatchNorm: takes `fold_batchnorm(variables)` (inference only)

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if self.folded and self.train:
            raise DN2Error("a folded ResNet has no BatchNorm to train: build it with folded=False for train=True")
        conv = functools.partial(nn.Conv, use_bias=self.folded, dtype=self.dtype)
        if self.folded:
            norm = _identity_norm
        else:
            norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, epsilon=1e-5,
                                     dtype=self.dtype)
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


def _identity_norm(name: str) -> Callable[[jax.Array], jax.Array]:
    """Stands in for a BatchNorm that `fold_batchnorm` merged into the conv before it."""
    del name
    return lambda x: x


#: BatchNorm module -> the conv whose output it normalises, within one block (or at the root).
_BN_OF_CONV = {"bn1": "conv1", "bn2": "conv2", "bn3": "conv3", "downsample_1": "downsample_0"}
BN_EPSILON = 1e-5


def fold_batchnorm(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Inference-time BatchNorm folding: ResNet variables → variables of the same ResNet built with `folded=True`.

    Every BatchNorm (running mean μ, variance σ², scale γ, bias β, eps 1e-5) is merged into the conv before it:
    kernel (kh, kw, in, out) · γ/√(σ²+ε) per output channel, plus a bias β − μγ/√(σ²+ε) of shape (out,).
    Computed in float64 and stored as float32; the features match the unfolded net to float32 rounding.
    Pure: the input is not modified (its fingerprint is unchanged). Returns {'params': ...} (no 'batch_stats').
    """
    if "params" not in variables or "batch_stats" not in variables:
        raise DN2Error("fold_batchnorm needs ResNet variables with 'params' and 'batch_stats', "
                       f"got {sorted(variables)}")
    params = traverse_util.flatten_dict(variables["params"])
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    out: dict[tuple[str, ...], np.ndarray] = {}
    folded = set()
    for path, leaf in params.items():
        *parent, module, leaf_name = path
        if module in _BN_OF_CONV:
            continue
        bn = (*parent, {v: k for k, v in _BN_OF_CONV.items()}.get(module, ""))
        if leaf_name != "kernel" or (*bn, "scale") not in params:
            out[path] = np.asarray(leaf)
            continue
        gamma, beta = (np.asarray(params[(*bn, k)], np.float64) for k in ("scale", "bias"))
        mean, var = (np.asarray(stats[(*bn, k)], np.float64) for k in ("mean", "var"))
        factor = gamma / np.sqrt(var + BN_EPSILON)
        out[path] = (np.asarray(leaf, np.float64) * factor).astype(np.float32)
        out[(*parent, module, "bias")] = (beta - mean * factor).astype(np.float32)
        folded.add(bn)
    unfolded = {p[:-1] for p in params if p[-2] in _BN_OF_CONV} - folded
    if unfolded:
        raise DN2Error(f"fold_batchnorm: BatchNorm without its conv: {'/'.join(sorted(unfolded)[0])}")
    return {"params": traverse_util.unflatten_dict(out)}


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)

RESNETS: dict[int, Callable[..., ResNet]] = {
    18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101, 152: ResNet152,
}


def _blocks_of(depth: int) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, uses bottlenecks) of a depth."""
    kw = RESNETS[depth].keywords
    return tuple(kw["stage_sizes"]), kw["block_cls"] is Bottleneck


def _depth(name: str) -> int:
    known = [f"resnet{d}" for d in RESNETS]
    if name not in known:
        raise DN2Error(f"unknown ResNet {name!r}; known: {', '.join(known)}")
    return int(name[len("resnet"):])


@functools.cache
def torch_layout(name: str) -> TorchLayout:
    """Flax variable path ↔ torchvision key and shape of ``name`` (``'resnet18'`` .. ``'resnet152'``).

    torchvision's ``layer2.0.downsample.1.weight`` is the Flax ``layer2_0/downsample_1/scale``.
    """
    return from_torch.torch_layout(name, RESNETS[_depth(name)](), 32, lambda module: module.replace("_", "."))


_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def guess_torch_model(state_dict: Mapping[str, np.ndarray]) -> tuple[str | None, str]:
    """The ResNet a torchvision state dict was made for (None: unknown) and a summary of its layout."""
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    counts = tuple(len(blocks[i]) for i in sorted(blocks))
    bottleneck = any(re.match(r"^layer\d+\.\d+\.conv3\.", k) for k in state_dict)
    about = f"blocks per stage {list(counts)}, {'bottleneck' if bottleneck else 'basic'} blocks"
    for depth in RESNETS:
        if _blocks_of(depth) == (counts, bottleneck):
            return f"resnet{depth}", about
    return None, about
