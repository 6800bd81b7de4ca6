"""Greedy k-center coreset (PatchCore) down to 1%: dn2_jax.coreset_select (JAX, exact, triangle-inequality
pruning) vs two NumPy greedy implementations (coreset_select_numpy: precomputed norms, one BLAS matrix-vector product
per step; and the same greedy in the form of PatchCore's reference code, the norm of the difference per step),
at 200k and 1M rows, plus peak RSS of the streamed coreset as the bank on disk grows.

Data (D = 128 float32, written once, chunkwise, to .npy files in /tmp):
  patches   real image patches: every 7x7x3 pixel window (stride 1, values in [0, 1]) of five scikit-image
            images (astronaut, coffee, chelsea, rocket, camera as RGB), shuffled (seed 0), mapped to 128 dims by
            dn2_jax.coreset.random_projection(147, 128, seed=0). Low intrinsic dimension, like patch features.
  gaussian  i.i.d. N(0, 1) rows (seed 0): the worst case for any pruning.
Each measurement runs in its own subprocess (peaks do not mix), the competitors alternate within one run:
  numpy     --numpy-steps steps timed, extrapolated linearly to the steps the JAX run made (every NumPy step
            costs the same: one pass over the bank); its picks are compared with the JAX ones.
  patchcore the same greedy written as PatchCore's reference code writes it (there in PyTorch), ported to NumPy:
            each step the norm of the difference to the new centre, ||x - c|| over the bank, a minimum and an argmax
            (--patchcore-steps steps timed, extrapolated the same way; picks compared too).
  jax       coreset_select on the loaded bank (compiled on a small bank first; the big shapes compile inside the
            timed call), the whole 1% selection or its first --jax-steps steps (``max_steps``).
  stream    coreset_select_stream reading the patches .npy in --chunk-rows chunks for growing prefixes: peak RSS.
Wall seconds and process CPU seconds (all threads) are both reported; on a shared machine the CPU ratio is the
steadier one. Results are written after every measurement (benchmarks/results/coreset.json).

Usage: nice -n 10 python benchmarks/coreset.py [--sizes 200000,1000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import MB, peak_rss_bytes, rss_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 128


def write_patches(path: Path, n: int) -> None:
    from skimage import data

    from dn2_jax.coreset import random_projection

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), np.stack([data.camera()] * 3, -1)]
    windows = np.concatenate([np.lib.stride_tricks.sliding_window_view(im, (7, 7, 3))[:, :, 0].reshape(-1, 147)
                              for im in images])  # uint8, ~170 MB
    total = len(windows)
    if n > total:
        raise SystemExit(f"only {total} patches available, asked for {n}")
    order = np.random.default_rng(0).permutation(total)[:n]
    proj = random_projection(147, DIM, seed=0)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for s in range(0, n, 100_000):
        rows = windows[order[s : s + 100_000]].astype(np.float32) / 255.0
        mm[s : s + len(rows)] = rows @ proj
    mm.flush()
    del mm


def write_gaussian(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for s in range(0, n, 100_000):
        mm[s : s + 100_000] = rng.standard_normal((min(100_000, n - s), DIM), dtype=np.float32)
    mm.flush()
    del mm


def greedy_patchcore_form(x: np.ndarray, fraction: float, *, seed: int = 0, max_steps: int | None = None):
    """Greedy k-center as PatchCore's reference code computes it, in NumPy: ``||x - c||`` per step."""
    from dn2_jax.coreset import coreset_size

    k = coreset_size(len(x), fraction)
    if max_steps is not None:
        k = min(k, max_steps)
    sel = np.empty(k, np.int64)
    sel[0] = int(np.random.default_rng(seed).integers(len(x)))
    min_d = np.linalg.norm(x - x[sel[0]], axis=1)
    for i in range(1, k):
        sel[i] = int(np.argmax(min_d))
        min_d = np.minimum(min_d, np.linalg.norm(x - x[sel[i]], axis=1))
    return sel


def child(args) -> dict:
    from dn2_jax.coreset import coreset_select, coreset_select_numpy, coreset_select_stream

    out = {"mode": args.mode, "data": Path(args.bank).stem, "rows": args.rows}
    if args.mode == "stream":
        mm = np.lib.format.open_memmap(args.bank, mode="r")
        sub = np.memmap(args.bank, dtype=np.float32, mode="r", offset=mm.offset, shape=(args.rows, mm.shape[1]))
        del mm
        base = rss_bytes()
        t, c = time.perf_counter(), time.process_time()
        sel = coreset_select_stream(sub, args.fraction, chunk_rows=args.chunk_rows, oversample=args.oversample)
        out.update(seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c, selected=len(sel),
                   baseline_mb=base / MB, peak_rss_mb=peak_rss_bytes() / MB)
        return out
    x = np.array(np.load(args.bank, mmap_mode="r")[: args.rows])
    steps = args.steps
    if args.mode == "jax":
        coreset_select(x[:4096], args.fraction)  # warm-up: compiles the small shapes only
        stats = {}
        t, c = time.perf_counter(), time.process_time()
        sel = coreset_select(x, args.fraction, max_steps=steps, stats=stats)
        out.update(seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c, selected=len(sel), **stats)
    else:
        select = coreset_select_numpy if args.mode == "numpy" else greedy_patchcore_form
        t, c = time.perf_counter(), time.process_time()
        sel = select(x, args.fraction, max_steps=steps)
        out.update(seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c, selected=len(sel),
                   seconds_per_step=(time.perf_counter() - t) / len(sel),
                   cpu_seconds_per_step=(time.process_time() - c) / len(sel))
    np.save(args.sel_out, sel)
    out["peak_rss_mb"] = peak_rss_bytes() / MB
    return out


def run_child(args, mode: str, bank: str, rows: int, steps: int | None = None, sel_out: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--rows", str(rows), "--bank", bank,
           "--fraction", str(args.fraction), "--chunk-rows", str(args.chunk_rows),
           "--oversample", str(args.oversample), "--sel-out", sel_out]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(out, flush=True)
    return out


def compare(args, bank: str, rows: int, jax_steps: int | None, numpy_steps: int) -> dict:
    a_out, b_out, p_out = bank + ".jax.npy", bank + ".np.npy", bank + ".pc.npy"
    jx = run_child(args, "jax", bank, rows, jax_steps, a_out)
    nx = run_child(args, "numpy", bank, rows, numpy_steps, b_out)
    px = run_child(args, "patchcore", bank, rows, args.patchcore_steps, p_out)
    a, b, p = np.load(a_out), np.load(b_out), np.load(p_out)
    steps = jx["selected"]  # numpy: each step costs one pass, scale its per-step time to the JAX run's steps
    r = {"data": jx["data"], "rows": rows, "selected_of": max(1, int(args.fraction * rows)), "steps": steps,
         "jax": jx, "numpy": nx, "patchcore": px, "picks_equal": int(np.argmin(np.r_[a[: len(b)] == b, False])),
         "patchcore_picks_equal": int(np.argmin(np.r_[a[: len(p)] == p, False])), "load_avg": os.getloadavg()}
    for name, peer in (("numpy", nx), ("patchcore", px)):
        r[f"{name}_seconds_extrapolated"] = peer["seconds_per_step"] * steps
        r[f"{name}_cpu_seconds_extrapolated"] = peer["cpu_seconds_per_step"] * steps
        r[f"speedup_{name}_wall"] = r[f"{name}_seconds_extrapolated"] / jx["seconds"]
        r[f"speedup_{name}_cpu"] = r[f"{name}_cpu_seconds_extrapolated"] / jx["cpu_seconds"]
    print(r["data"], rows, "steps", steps, *(f"{name} wall x {r[f'speedup_{name}_wall']:.2f} cpu x "
                                             f"{r[f'speedup_{name}_cpu']:.2f}" for name in ("numpy", "patchcore")),
          flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="jax")
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--bank", default="")
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--sizes", default="200000,1000000", help="bank sizes of the JAX vs NumPy runs")
    ap.add_argument("--jax-steps", default="0,300", help="per size: steps of the JAX run (0: the whole 1%%)")
    ap.add_argument("--numpy-steps", type=int, default=40)
    ap.add_argument("--patchcore-steps", type=int, default=10)
    ap.add_argument("--gaussian-rows", type=int, default=200_000)
    ap.add_argument("--gaussian-steps", type=int, default=300)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--stream-rows", default="100000,300000,1000000", help="bank sizes of the stream runs")
    ap.add_argument("--oversample", type=float, default=2.0)
    ap.add_argument("--sel-out", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.sizes, args.jax_steps, args.numpy_steps, args.patchcore_steps = "20000,50000", "0,100", 20, 5
        args.gaussian_rows, args.gaussian_steps, args.stream_rows = 20_000, 50, "20000,50000"
    sizes = [int(v) for v in args.sizes.split(",")]
    jax_steps = [int(v) or None for v in args.jax_steps.split(",")]
    stream_sizes = [int(v) for v in args.stream_rows.split(",")]
    patches, gauss = "/tmp/dn2_coreset_patches.npy", "/tmp/dn2_coreset_gaussian.npy"
    write_patches(Path(patches), max(sizes + stream_sizes))
    write_gaussian(Path(gauss), args.gaussian_rows)
    results = {"dim": DIM, "fraction": args.fraction, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
               "numpy_steps": args.numpy_steps, "chunk_rows": args.chunk_rows, "oversample": args.oversample,
               "load_avg_start": os.getloadavg(), "runs": [], "stream": []}
    RESULTS.mkdir(exist_ok=True)
    out_file = RESULTS / ("coreset_quick.json" if args.quick else "coreset.json")

    def save():
        out_file.write_text(json.dumps(results, indent=2) + "\n")

    for rows, steps in zip(sizes, jax_steps, strict=True):
        results["runs"].append(compare(args, patches, rows, steps, args.numpy_steps))
        save()
    results["runs"].append(compare(args, gauss, args.gaussian_rows, args.gaussian_steps, args.numpy_steps))
    save()
    for n in stream_sizes:
        results["stream"].append(run_child(args, "stream", patches, n))
        save()
    results["load_avg_end"] = os.getloadavg()
    save()
    for p in (patches, gauss):
        for f in (p, p + ".jax.npy", p + ".np.npy", p + ".pc.npy"):
            if os.path.exists(f):
                os.remove(f)


if __name__ == "__main__":
    main()
