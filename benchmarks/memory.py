"""Peak memory of exact DN2 kNN scoring as the bank grows: working memory must stay flat in N.

Scores M = 10k queries (D = 2048, k = 2) against banks of 100k, 400k and 1M float32 embeddings (1M x 2048 =
8 GB). The bank is written once, chunkwise, to a raw float32 file in /tmp and each measurement runs in its
own subprocess (so peaks do not mix), in one or both modes:

  stream    the bank is read from the file in fixed chunks of ``--chunk-rows`` rows (np.fromfile at an
            offset, no mmap pages left resident) and fed to ``dn2_jax.knn.knn_chunks``; the inputs resident
            at any time are the queries and one chunk, so the peak must not depend on N at all.
  memory    the whole bank is loaded first (only for banks up to ``--memory-max-gb``), then ``knn`` runs;
            the peak *above the loaded inputs* is the kNN working set, which must not depend on N.

Setup (loading the bank, compiling the kernel with one warm-up call) happens first; then the kernel's peak-RSS
mark is reset (/proc/self/clear_refs) and the timed scoring runs. Reported per run: RSS after setup
(baseline), peak RSS during scoring (VmHWM), their difference, and wall time of the scoring.
Usage: ``python benchmarks/memory.py`` (~10-15 min on 2 cores), ``--quick`` (small sizes, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) so setup (loading, copies) does not count; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else the lifetime peak (ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_bank(path: Path, n: int, d: int, seed: int = 0, chunk: int = 50_000) -> None:
    """Writes an (n, d) float32 standard-normal bank to ``path`` chunk by chunk (never all in memory)."""
    if path.exists() and path.stat().st_size == n * d * 4:
        return
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            rng.standard_normal((min(chunk, n - start), d), dtype=np.float32).tofile(f)


def read_rows(path: Path, start: int, rows: int, d: int) -> np.ndarray:
    return np.fromfile(path, dtype=np.float32, count=rows * d, offset=start * d * 4).reshape(rows, d)


def worker(a: argparse.Namespace) -> dict:
    """One measurement, in a fresh process. Prints its result as one JSON line."""
    import importlib

    import jax
    import jax.numpy as jnp

    knn_mod = importlib.import_module("dn2_jax.knn")
    queries = jnp.asarray(np.random.default_rng(1).standard_normal((a.m, a.d), dtype=np.float32))
    jax.block_until_ready(queries)
    bank = None
    if a.mode == "memory":
        bank = jnp.asarray(read_rows(a.bank, 0, a.n, a.d))
        sq = knn_mod.squared_norms(bank)
        jax.block_until_ready(sq)
    if a.mode == "stream":  # compile the chunk kernel outside the measurement (compilation is not work memory)
        knn_mod.knn(queries, read_rows(a.bank, 0, min(a.chunk_rows, a.n), a.d), a.k)[0].block_until_ready()
    else:
        knn_mod.knn(queries, bank, a.k, bank_sq_norms=sq)[0].block_until_ready()
    peak_reset = reset_peak_rss()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    if a.mode == "memory":
        d, _ = knn_mod.knn(queries, bank, a.k, bank_sq_norms=sq)
    else:
        chunks = ((s, read_rows(a.bank, s, min(a.chunk_rows, a.n - s), a.d)) for s in range(0, a.n, a.chunk_rows))
        d, _ = knn_mod.knn_chunks(queries, chunks, a.k)
    score = jax.block_until_ready(jnp.mean(d, axis=1))
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "mode": a.mode, "n": a.n, "d": a.d, "m": a.m, "k": a.k,
        "chunk_rows": a.chunk_rows if a.mode == "stream" else None,
        "bank_mb": a.n * a.d * 4 / MB,
        "resident_inputs_mb": (a.m * a.d * 4 + (a.n if a.mode == "memory" else a.chunk_rows) * a.d * 4) / MB,
        "baseline_rss_mb": baseline / MB, "peak_rss_mb": peak / MB, "peak_minus_baseline_mb": (peak - baseline) / MB,
        "peak_reset": peak_reset, "seconds": secs, "gflops": 2.0 * a.m * a.n * a.d / secs / 1e9,
        "score_mean": float(score.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_000_000], help="bank sizes N")
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--m", type=int, default=10_000, help="queries")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=100_000, help="rows per streamed chunk")
    p.add_argument("--modes", nargs="+", default=["stream", "memory"], choices=["stream", "memory"])
    p.add_argument("--memory-max-gb", type=float, default=4.0, help="largest bank loaded whole in 'memory' mode")
    p.add_argument("--bank", type=Path, default=None, help="bank file (default: /tmp/dn2_membench_<N>x<D>.f32)")
    p.add_argument("--keep", action="store_true", help="keep the generated bank file")
    p.add_argument("--quick", action="store_true", help="N = 10k, 40k, 100k; M = 1k; chunks of 10k rows")
    p.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    p.add_argument("--worker", choices=["stream", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.mode = a.worker
        print(json.dumps(worker(a)))
        return
    if a.quick:
        a.sizes, a.m, a.chunk_rows = [10_000, 40_000, 100_000], 1_000, 10_000

    n_max = max(a.sizes)
    bank = a.bank or Path(f"/tmp/dn2_membench_{n_max}x{a.d}.f32")
    t0 = time.perf_counter()
    write_bank(bank, n_max, a.d)
    print(f"bank file {bank} ({n_max * a.d * 4 / 2**30:.1f} GiB) ready in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr, flush=True)
    rows = []
    try:
        for mode in a.modes:
            for n in sorted(a.sizes):
                if mode == "memory" and n * a.d * 4 > a.memory_max_gb * 2**30:
                    continue
                cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--d", str(a.d), "--m", str(a.m),
                       "--k", str(a.k), "--chunk-rows", str(a.chunk_rows), "--bank", str(bank)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{mode:6s} N={n:>9,}: peak {row['peak_rss_mb']:8.0f} MB, above baseline "
                      f"{row['peak_minus_baseline_mb']:7.0f} MB, {row['seconds']:6.1f}s", file=sys.stderr, flush=True)
    finally:
        if not a.keep and a.bank is None:
            bank.unlink(missing_ok=True)

    head = f"{'mode':6} {'N':>9} {'bank MB':>8} {'inputs MB':>9} {'baseline MB':>11} {'peak MB':>8} " \
           f"{'peak-base MB':>12} {'s':>7} {'GFLOP/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:6} {r['n']:>9,} {r['bank_mb']:>8.0f} {r['resident_inputs_mb']:>9.0f} "
                     f"{r['baseline_rss_mb']:>11.0f} {r['peak_rss_mb']:>8.0f} {r['peak_minus_baseline_mb']:>12.0f} "
                     f"{r['seconds']:>7.1f} {r['gflops']:>8.1f}")
    table = "\n".join(lines)
    print(f"M={a.m} queries, D={a.d}, k={a.k}; stream chunks of {a.chunk_rows:,} rows")
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "rows": rows, "table": table}, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
