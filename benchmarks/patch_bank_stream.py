"""A patch bank larger than memory through `dn2_jax.coreset_select_stream` (issue 15): 10k images x 28x28 patches
x 300 dims (7.84M rows, 9.4 GB float32 on disk) down to 1%, with the peak RSS of the selecting process.

The bank is synthetic but clustered like patch features: 2,000 centres drawn N(0, 1) in 300 dims, each row a
centre plus N(0, 0.3^2) noise (seed 0), written chunkwise to a .npy memmap (never whole in memory). The selection
reads it in --chunk-rows chunks, projects each to --proj-dim dims, keeps each chunk's greedy coreset of
oversample x fraction, then runs the final greedy on that pool.

    .venv/bin/python benchmarks/patch_bank_stream.py [--images 10000] [--out benchmarks/results/patch_bank_stream.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import MB, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def write_bank(path: Path, rows: int, dim: int, step: int = 200_000) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for s in range(0, rows, step):
        n = min(step, rows - s)
        mm[s : s + n] = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim), np.float32)
    mm.flush()
    del mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--oversample", type=float, default=2.0)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--bank", default="/tmp/dn2_patch_bank.npy")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "patch_bank_stream.json")
    args = ap.parse_args()
    from dn2_jax.coreset import coreset_select_stream
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()
    rows = args.images * args.grid * args.grid
    bank = Path(args.bank)
    t = time.perf_counter()
    write_bank(bank, rows, args.dim)
    written = time.perf_counter() - t
    reset_peak_rss()  # the memmapped writes above are not the selection's memory
    base = rss_bytes()
    t, c = time.perf_counter(), time.process_time()
    sel = coreset_select_stream(str(bank), args.fraction, proj_dim=args.proj_dim, chunk_rows=args.chunk_rows,
                                oversample=args.oversample)
    out = {"date": time.strftime("%Y-%m-%d"), "rows": rows, "dim": args.dim, "bank_gb": rows * args.dim * 4 / 1e9,
           "fraction": args.fraction, "oversample": args.oversample, "chunk_rows": args.chunk_rows,
           "proj_dim": args.proj_dim, "selected": len(sel), "unique": len(np.unique(sel)),
           "write_seconds": written, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
           "baseline_rss_mb": base / MB, "peak_rss_mb": peak_rss_bytes() / MB, "load_avg": os.getloadavg()}
    bank.unlink()
    print(json.dumps(out, indent=1))
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
