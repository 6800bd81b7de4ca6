"""Float32 matmul on this CPU: XLA under each of its CPU GEMM back-end flags vs NumPy (OpenBLAS).

Why it exists: exact kNN at D = 2048 is ~98% matmul, so the kNN ratio to faiss (``benchmarks/knn.py``) is
bounded by how fast XLA:CPU multiplies float32 matrices compared with the OpenBLAS SGEMM inside faiss.
This measures one kNN-sized tile product, ``(2048 x 2048) @ (2048 x 4096)`` at ``Precision.HIGHEST``, in a
fresh subprocess per XLA flag set (flags are read once per process), alternating NumPy in every subprocess,
and reports GFLOP/s (best of ``--repeats``) and the XLA / NumPy ratio measured side by side.

Usage: ``python benchmarks/matmul.py`` (~1 min); JSON to ``benchmarks/results/matmul.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

#: XLA:CPU flag sets that select a different dot implementation (names as in this jaxlib's XLA).
FLAG_SETS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_fusion_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusion_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
}

M, K, N = 2048, 2048, 4096


def _child(repeats: int) -> None:
    """Runs in a subprocess: times XLA and NumPy alternately, prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((M, K), np.float32), rng.random((N, K), np.float32)
    da, db = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(lambda x, y: jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST))
    ref = a[:64].astype(np.float64) @ b.T.astype(np.float64)
    err = float(np.abs(np.asarray(dot(da, db))[:64] - ref).max() / np.abs(ref).max())  # also compiles
    xla, npy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dot(da, db).block_until_ready()
        xla.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.dot(a, b.T)
        npy.append(time.perf_counter() - t)
    flops = 2 * M * K * N
    print(json.dumps({"xla_gflops": flops / min(xla) / 1e9, "numpy_gflops": flops / min(npy) / 1e9,
                      "xla_rel_error": err}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--flags", nargs="+", default=list(FLAG_SETS), choices=list(FLAG_SETS))
    p.add_argument("--out", type=Path, default=RESULTS / "matmul.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.repeats)
        return 0
    rows = []
    for name in args.flags:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG_SETS[name]}".strip()}
        proc = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            rows.append({"flags": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["xla_gflops"] / r["numpy_gflops"]
        rows.append({"flags": name, "xla_flags": FLAG_SETS[name], **r, "xla_over_numpy": ratio})
        print(f"{name:18s} XLA {r['xla_gflops']:5.0f} GFLOP/s  NumPy {r['numpy_gflops']:5.0f}  "
              f"ratio {ratio:.2f}  rel.err {r['xla_rel_error']:.1e}", flush=True)
    import jax
    import numpy as np

    meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "shape": [M, K, N]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
