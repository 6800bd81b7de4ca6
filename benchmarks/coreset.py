"""Greedy k-center coreset (PatchCore) of 1M patch features down to 1%: dn2_jax (JAX, on device) vs NumPy, and
peak RSS of the streamed coreset as the bank on disk grows.

Data: N x D float32 clustered features (1000 Gaussian clusters, seed 0), written once, chunkwise, to a .npy in
/tmp. Each measurement runs in its own subprocess (peaks do not mix):

  jax       dn2_jax.coreset.coreset_select on the whole bank (loaded first), 1% -> 10k selected rows.
  numpy     dn2_jax.coreset.coreset_select_numpy (BLAS matrix-vector product per step): --numpy-steps steps
            timed and extrapolated linearly to the full selection (each step costs the same: one pass);
            the selections of those steps are compared with the JAX ones.
  stream    dn2_jax.coreset.coreset_select_stream reading the .npy in --chunk-rows chunks (np.fromfile, no
            mapped pages resident) for growing prefixes of the bank: peak RSS must stay flat.

Usage: nice -n 10 python benchmarks/coreset.py [--rows N] [--stream-rows 100000,300000,1000000] [--quick];
writes benchmarks/results/coreset.json. (--rows 1000000 is the full goal; on a shared 2-core CPU the JAX run
alone takes tens of minutes there, so the committed run used --rows 200000.)
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


def write_bank(path: Path, n: int, dim: int, chunk: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dim)).astype(np.float32) * 2.0
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        mm[s : s + m] = centres[rng.integers(1000, size=m)] + rng.normal(size=(m, dim)).astype(np.float32)
    mm.flush()
    del mm


def child(args) -> dict:
    from dn2_jax.coreset import coreset_select, coreset_select_numpy, coreset_select_stream

    out = {"mode": args.mode, "rows": args.rows}
    if args.mode == "stream":
        mm = np.lib.format.open_memmap(args.bank, mode="r")
        sub = np.memmap(args.bank, dtype=np.float32, mode="r", offset=mm.offset, shape=(args.rows, mm.shape[1]))
        del mm
        base = rss_bytes()
        t = time.perf_counter()
        sel = coreset_select_stream(sub, args.fraction, chunk_rows=args.chunk_rows, oversample=args.oversample)
        out.update(seconds=time.perf_counter() - t, selected=len(sel), baseline_mb=base / MB,
                   peak_rss_mb=peak_rss_bytes() / MB)
        return out
    x = np.array(np.load(args.bank, mmap_mode="r")[: args.rows])
    if args.mode == "jax":
        coreset_select(x[:4096], args.fraction)  # warm-up: compiles the small shapes only
        t = time.perf_counter()
        sel = coreset_select(x, args.fraction)
        out.update(seconds=time.perf_counter() - t, selected=len(sel))
        np.save(args.sel_out, sel)
    else:
        t = time.perf_counter()
        sel = coreset_select_numpy(x, args.fraction, max_steps=args.numpy_steps)
        seconds = time.perf_counter() - t
        k = max(1, int(args.fraction * len(x)))
        out.update(seconds_measured=seconds, steps_measured=len(sel), selected=k,
                   seconds=seconds * (k - 1) / (len(sel) - 1), extrapolated=True)
        np.save(args.sel_out, sel)
    out["peak_rss_mb"] = peak_rss_bytes() / MB
    return out


def run_child(args, mode: str, rows: int, sel_out: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--rows", str(rows), "--bank", args.bank,
           "--fraction", str(args.fraction), "--numpy-steps", str(args.numpy_steps), "--chunk-rows",
           str(args.chunk_rows), "--oversample", str(args.oversample), "--sel-out", sel_out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(out, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="jax")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bank", default="/tmp/dn2_coreset_bank.npy")
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--numpy-steps", type=int, default=300)
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
        args.rows, args.numpy_steps, args.stream_rows = 50_000, 50, "20000,50000"
    sizes = [int(v) for v in args.stream_rows.split(",")]
    write_bank(Path(args.bank), max([args.rows, *sizes]), args.dim)
    jax_sel, np_sel = args.bank + ".jax.npy", args.bank + ".np.npy"
    results = {"n": args.rows, "chunk_rows": args.chunk_rows, "oversample": args.oversample, "dim": args.dim,
               "fraction": args.fraction, "cpu_count": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "note": "shared 2-core machine, other jobs running"}
    results["jax"] = run_child(args, "jax", args.rows, jax_sel)
    results["numpy"] = run_child(args, "numpy", args.rows, np_sel)
    a, b = np.load(jax_sel), np.load(np_sel)
    results["first_steps_equal"] = int(np.argmin(np.r_[a[: len(b)] == b, False]))
    results["speedup"] = results["numpy"]["seconds"] / results["jax"]["seconds"]
    results["stream"] = [run_child(args, "stream", n) for n in sizes]
    RESULTS.mkdir(exist_ok=True)
    name = "coreset_quick.json" if args.quick else "coreset.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    for p in (args.bank, jax_sel, np_sel):
        os.remove(p)


if __name__ == "__main__":
    main()
