"""kNN precision with a shared offset: dn2_jax.knn (centred, the default, and with center=0) vs a float64 brute force.

    .venv/bin/python benchmarks/precision.py

N = 10,000 bank rows, M = 2,000 queries, D = 512, k = 2, N(0, 1) features plus offsets 0, 100 and 1000.
"""

import time

import numpy as np

import dn2_jax as dn2

rng = np.random.default_rng(0)
n, m, d, k = 10000, 2000, 512, 2
base_b = rng.normal(size=(n, d))
base_q = rng.normal(size=(m, d))
for offset in (0.0, 100.0, 1e3):
    bank = (base_b + offset).astype(np.float32)
    queries = (base_q + offset).astype(np.float32)
    b64 = bank.astype(np.float64) - offset  # exact shift
    q64 = queries.astype(np.float64) - offset
    ref = (q64**2).sum(1)[:, None] - 2 * q64 @ b64.T + (b64**2).sum(1)[None, :]
    want_i = np.argsort(ref, axis=1, kind="stable")[:, :k]
    want_d = np.take_along_axis(ref, want_i, 1)
    for label, kw in (("centred (default)", {}), ("uncentred (center=0)", {"center": np.zeros(d, np.float32)})):
        t = time.perf_counter()
        dd, ii = dn2.knn(queries, bank, k, **kw)
        dd, ii = np.asarray(dd, np.float64), np.asarray(ii)
        rel = np.abs(dd / want_d - 1).max()
        wrong = int((ii != want_i).any(1).sum())
        print(f"offset {offset:g}: {label}: max rel err {rel:.2e}, queries with a wrong neighbour {wrong}/{m}, "
              f"{time.perf_counter() - t:.1f}s", flush=True)
