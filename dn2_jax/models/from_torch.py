"""One torch state dict → Flax variables conversion for every backbone family.

A family (``resnet.py``, ``efficientnet.py``) supplies two things:

- ``torch_layout(name) -> TorchLayout``: for each Flax variable path, the torch key and torch shape; built by
  `torch_layout` from the Flax model's own variable shapes and the family's module-name rule (the leaf
  names and the per-leaf transform are shared: kernel/scale → weight, mean → running_mean, var →
  running_var; conv OIHW → HWIO, linear (out, in) → (in, out));
- ``guess_torch_model(state_dict) -> (name or None, summary)``: which model of the family a state dict was
  made for, so that a checkpoint of another size is named in the error.

`from_torch_state_dict` then checks missing keys, unexpected keys and shapes with the same messages for every
family and returns ``{'params', 'batch_stats'}`` in float32. ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dn2_jax.errors import DN2Error

Path = tuple[str, ...]
Guess = Callable[[Mapping[str, np.ndarray]], tuple[str | None, str]]

# Flax (collection, leaf name) → torch leaf name; the same for every family.
LEAF_NAMES: dict[tuple[str, str], str] = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """Where each Flax variable of model `name` lives in its torch state dict.

    keys: Flax variable path (e.g. ``('params', 'layer1_0', 'conv1', 'kernel')``) → (torch key, torch shape),
      in network order (natural order of the torch keys: ``_blocks.2`` before ``_blocks.10``).
    """

    name: str
    keys: dict[Path, tuple[str, tuple[int, ...]]]

    def torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """torch key → torch shape (without ``num_batches_tracked``)."""
        return dict(self.keys.values())


def to_flax(array: np.ndarray) -> np.ndarray:
    """One torch leaf → its Flax layout: conv (O, I/g, kh, kw) → (kh, kw, I/g, O), linear (O, I) → (I, O)."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax variable shape (inverse of `to_flax`)."""
    if len(flax_shape) == 4:
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(flax_shape[::-1])


def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def torch_layout(name: str, module: nn.Module, input_size: int, module_key: Callable[[str], str]) -> TorchLayout:
    """The `TorchLayout` of `module` (shapes from `jax.eval_shape` of its init at `input_size`², no compute).

    module_key: Flax module name → torch module name (e.g. ``'layer2_0'`` → ``'layer2.0'``).
    """
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), x))
    keys = {}
    for path, leaf in shapes.items():
        collection, *modules, leaf_name = path
        key = ".".join([module_key(m) for m in modules] + [LEAF_NAMES[collection, leaf_name]])
        keys[path] = (key, torch_shape(tuple(leaf.shape)))
    return TorchLayout(name, dict(sorted(keys.items(), key=lambda kv: _natural(kv[1][0]))))


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray], layout: TorchLayout,
                          guess: Guess | None = None) -> dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` (float32) of `layout.name` from a torch state dict (numpy).

    Raises `DN2Error` listing missing and unexpected keys, or naming the first wrong shape (expected vs got),
    and, when `guess` recognises another model of the family, which backbone to pick instead.
    """
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    wanted = {key: (path, shape) for path, (key, shape) in layout.keys.items()}

    def hint() -> str:
        found, about = guess(given) if guess is not None else (None, "")
        if found is None or found == layout.name:
            return ""
        return f"; this looks like a {found} checkpoint ({about}), not {layout.name}: pick the backbone {found}"

    missing = [k for k in wanted if k not in given]
    unexpected = sorted((k for k in given if k not in wanted), key=_natural)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
        raise DN2Error(f"not a {layout.name} state dict: {'; '.join(problems)}{hint()}")
    flat = {}
    for key, (path, shape) in wanted.items():
        array = np.asarray(given[key])
        if array.shape != shape:
            raise DN2Error(f"wrong shape for {key} in the {layout.name} state dict: expected {shape}, "
                           f"got {array.shape}{hint()}")
        flat[path] = to_flax(array.astype(np.float32))
    return traverse_util.unflatten_dict(flat)
