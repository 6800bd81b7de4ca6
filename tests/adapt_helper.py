"""A tiny BatchNorm CNN and toy images for tests/test_adapt.py, plus subprocess entry points (not collected)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dn2_jax.preprocessing import Preset

PRESET = Preset(resize=16, crop=16, mean=(127.0,) * 3, std=(128.0,) * 3)


class TinyNet(nn.Module):
    """conv → BN → relu → conv → BN → relu → global mean: {'pooled': (N, 16)}."""

    train: bool = False
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9)
        x = nn.relu(norm(name="bn0")(nn.Conv(8, (3, 3), 2, use_bias=False, name="conv0")(x)))
        x = nn.relu(norm(name="bn1")(nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
        return {"pooled": jnp.mean(x, axis=(1, 2))}


def variables(seed: int = 0):
    v = TinyNet().init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
    stats = jax.tree.map(lambda a: a + 0.1, v["batch_stats"])  # non-trivial running statistics
    return jax.tree.map(np.asarray, {"params": v["params"], "batch_stats": stats})


def images(n: int = 32, seed: int = 0) -> np.ndarray:
    """n smooth-ish random RGB 16×16 uint8 images from a few prototypes (a 'normal class')."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(40, 215, (3, 4, 4, 3))
    base = protos[rng.integers(0, 3, n)].repeat(4, 1).repeat(4, 2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _run(cfg_json: str, ckpt: str, kill_after: int) -> None:
    from dn2_jax import adapt

    def on_epoch(epoch, _):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = adapt.AdaptConfig(**json.loads(cfg_json))
    adapt.adapt(images(), None, variables(), cfg, module=TinyNet(), preset=PRESET, checkpoint_dir=ckpt,
                progress=False, on_epoch=on_epoch)


def _devices(out: str) -> None:
    """Two steps on 4 devices and on 1 device (same process, 4 simulated CPU devices); writes max |diff|."""
    from dn2_jax import adapt
    from dn2_jax.sharding import data_mesh

    result = {}
    for bn in ("frozen", "batch"):
        cfg = adapt.AdaptConfig(epochs=1, batch_size=8, learning_rate=0.05, bn=bn, freeze=())
        runs = []
        for devs in (jax.local_devices(), jax.local_devices()[:1]):
            v, _ = adapt.adapt(images(16), None, variables(), cfg, module=TinyNet(), preset=PRESET,
                               mesh=data_mesh(devs), progress=False)
            runs.append(v)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), runs[0], runs[1]))
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), runs[0], variables()))
        result[bn] = {"max_diff": max(diffs), "max_moved": max(moved), "devices": len(jax.local_devices())}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        _run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "devices":
        _devices(sys.argv[2])
