"""Exact kNN benchmark: dn2_jax vs faiss IndexFlatL2, scikit-learn brute NearestNeighbors and PyOD KNN.

All contenders get the same float32 data in one process and are run round-robin (one call each per round),
so machine drift hits all alike. Before a contender's timings count, its answer is checked: squared
distances against a float64 brute force on a sample of queries (rtol 1e-4; indices may differ only among
ties) and, for every query, against dn2_jax's distances (rtol 1e-4).

Timed calls (bank already loaded/indexed; queries given as host float32 arrays):
  dn2_jax  ``knn(queries, bank, k, bank_sq_norms=...)`` on device arrays (norms computed once per bank);
           the first call (compile + run) is reported separately and never counted.
  faiss    ``IndexFlatL2.search(queries, k)`` (``add`` is untimed).
  sklearn  ``NearestNeighbors(algorithm="brute").kneighbors(queries, k)`` (``fit`` is untimed).
  pyod     ``KNN(method="mean").decision_function(queries)`` -- the PyOD score is the mean *Euclidean*
           distance, checked against the mean of sqrt(dn2 distances). PyOD's ``fit`` also scores the whole
           training set (an N x N search, hours at N = 200k), so the fitted NearestNeighbors is attached
           instead of calling ``fit``; only ``decision_function`` is timed.

Usage: ``python benchmarks/knn.py`` (full grid, ~15 min on 2 quiet cores), ``--quick`` (seconds), or
restrict with ``--n``, ``--d``, ``--k``, ``--m``, ``--contenders``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from jax import lax

from dn2_jax.hostmem import keep_freed_memory

KNN = importlib.import_module("dn2_jax.knn")  # the module (``dn2_jax.knn`` the attribute is the function)
RESULTS = Path(__file__).resolve().parent / "results"
RTOL = 1e-4

# ---------------------------------------------------------------------------------------------- helpers


class PeakRSS:
    """Samples this process's RSS in a thread; ``delta`` = peak during the block minus RSS at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.start


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) through jax.monitoring events."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            self.count += 1
            self.seconds += duration


def matmul_peak(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` GFLOP/s of a plain float32 size^2 matmul: jnp at HIGHEST precision, and NumPy."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision=lax.Precision.HIGHEST))
    mm(ja, jb).block_until_ready()
    flops = 2.0 * size**3
    out = {}
    for name, fn in (("jnp", lambda: mm(ja, jb).block_until_ready()), ("numpy", lambda: a @ b)):
        best = min(_timed(fn)[0] for _ in range(repeats))
        out[name] = flops / best / 1e9
    return out


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def blas_info() -> list[dict]:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries (kernel = ``architecture``)."""
    from threadpoolctl import threadpool_info

    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads", "filepath")
    return [{k: v for k, v in lib.items() if k in keys} for lib in threadpool_info()]


# ---------------------------------------------------------------------------------------------- contenders
# Each factory takes the bank and k, does the untimed setup, and returns a search function that maps
# host float32 queries to (squared distances (M, k) float64 or None, indices or None, score (M,) or None).

Search = Callable[[np.ndarray], tuple]


def make_dn2(bank: np.ndarray, k: int) -> Search:
    jbank = jnp.asarray(bank)
    sq = KNN.squared_norms(jbank).block_until_ready()

    def search(q: np.ndarray) -> tuple:
        d, i = jax.block_until_ready(KNN.knn(q, jbank, k, bank_sq_norms=sq))
        return np.asarray(d, np.float64), np.asarray(i), None

    return search


def make_faiss(bank: np.ndarray, k: int) -> Search:
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)

    def search(q: np.ndarray) -> tuple:
        d, i = index.search(q, k)
        return d.astype(np.float64), i, None

    return search


def make_sklearn(bank: np.ndarray, k: int) -> Search:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)

    def search(q: np.ndarray) -> tuple:
        d, i = nn.kneighbors(q, k)
        return d.astype(np.float64) ** 2, i, None

    return search


def make_pyod(bank: np.ndarray, k: int) -> Search:
    from pyod.models.knn import KNN as PyodKNN
    from sklearn.neighbors import NearestNeighbors

    det = PyodKNN(n_neighbors=k, method="mean")
    # What fit() would leave behind, minus the N x N training-set scoring (see the module docstring).
    det.neigh_ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)
    det.decision_scores_ = np.zeros(1)
    det.threshold_ = 0.0
    det.labels_ = np.zeros(1, int)

    def search(q: np.ndarray) -> tuple:
        return None, None, np.asarray(det.decision_function(q), np.float64)

    return search


CONTENDERS: dict[str, Callable[[np.ndarray, int], Search]] = {
    "dn2_jax": make_dn2,
    "faiss": make_faiss,
    "sklearn": make_sklearn,
    "pyod": make_pyod,
}


# ---------------------------------------------------------------------------------------------- checks


def check(name: str, out: tuple, ref_d: np.ndarray, sample: np.ndarray, bank: np.ndarray,
          q64: np.ndarray, dn2_d: np.ndarray | None) -> str | None:
    """None if ``out`` is right, else a message. ``ref_d`` = float64 sorted k-NN sq. distances of ``sample``."""
    d, i, score = out
    scale = max(1.0, float(np.abs(ref_d).max()))
    if score is not None:  # PyOD: mean Euclidean distance
        want = np.sqrt(ref_d).mean(axis=1)
        if not np.allclose(score[sample], want, rtol=RTOL, atol=RTOL * np.sqrt(scale)):
            return f"{name}: PyOD scores differ from the float64 reference"
        if dn2_d is not None and not np.allclose(score, np.sqrt(dn2_d).mean(1), rtol=RTOL):
            return f"{name}: PyOD scores differ from dn2_jax's"
        return None
    if not np.allclose(d[sample], ref_d, rtol=RTOL, atol=RTOL * scale):
        return f"{name}: distances differ from the float64 reference"
    true_d = ((q64[:, None, :] - bank[i[sample]].astype(np.float64)) ** 2).sum(-1)  # returned indices' distances
    if not np.allclose(true_d, ref_d, rtol=RTOL, atol=RTOL * scale):
        return f"{name}: returned indices are not nearest neighbours (beyond ties)"
    if dn2_d is not None and not np.allclose(d, dn2_d, rtol=RTOL, atol=RTOL * scale):
        return f"{name}: distances differ from dn2_jax's on some queries"
    return None


def reference(queries: np.ndarray, bank: np.ndarray, sample: np.ndarray, k: int) -> np.ndarray:
    """float64 brute-force k smallest squared distances for the sampled queries (bank scanned in chunks)."""
    q = queries[sample].astype(np.float64)
    q_sq = (q * q).sum(1)[:, None]
    best = np.full((len(sample), 0), np.inf)
    for s in range(0, bank.shape[0], 20000):
        b = bank[s:s + 20000].astype(np.float64)
        d = np.maximum(q_sq - 2.0 * q @ b.T + (b * b).sum(1)[None, :], 0.0)
        best = np.sort(np.concatenate([best, d], axis=1), axis=1)[:, :k]
    return best


# ---------------------------------------------------------------------------------------------- runner


def run_case(n: int, d: int, m: int, k: int, names: list[str], repeats: int, budget_s: float,
             compiles: CompileCounter, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((m, d), dtype=np.float32)
    sample = rng.choice(m, size=min(m, 128), replace=False)
    ref_d = reference(queries, bank, sample, k)
    q64 = queries[sample].astype(np.float64)
    flops = 2.0 * m * n * d
    searches = {name: CONTENDERS[name](bank, k) for name in names}
    rows = {name: {"contender": name, "n": n, "d": d, "m": m, "k": k, "times_s": [], "rss_delta_mb": 0.0}
            for name in names}
    t_case = time.perf_counter()

    # Round 0: one verified call each; it counts as a timing except for dn2_jax (it includes compilation).
    dn2_d = None
    for name in names:
        c0, s0 = compiles.count, compiles.seconds
        with PeakRSS() as mem:
            secs, out = _timed(lambda name=name: searches[name](queries))
        err = check(name, out, ref_d, sample, bank, q64, dn2_d)
        row = rows[name]
        row["verified"] = err is None
        row["error"] = err
        row["rss_delta_mb"] = mem.delta / 2**20
        if name == "dn2_jax":
            dn2_d = out[0]
            row["first_call_s"] = secs
            row["compile_s"] = compiles.seconds - s0
            row["compiles_first_call"] = compiles.count - c0
        elif err is None:
            row["times_s"].append(secs)
    names = [nm for nm in names if rows[nm]["verified"]]
    c_steady = compiles.count

    # Then round-robin until every contender has ``repeats`` timings, while the case budget allows
    # (dn2_jax always gets at least one steady-state call).
    while True:
        todo = [nm for nm in names if len(rows[nm]["times_s"]) < repeats]
        if not todo or (time.perf_counter() - t_case > budget_s and all(rows[nm]["times_s"] for nm in names)):
            break
        for name in todo:
            with PeakRSS() as mem:
                secs, _ = _timed(lambda name=name: searches[name](queries))
            rows[name]["times_s"].append(secs)
            rows[name]["rss_delta_mb"] = max(rows[name]["rss_delta_mb"], mem.delta / 2**20)
    if "dn2_jax" in rows:
        rows["dn2_jax"]["recompiles_steady"] = compiles.count - c_steady

    out = []
    for row in rows.values():
        if row["times_s"]:
            row["median_s"] = statistics.median(row["times_s"])
            row["gflops"] = flops / row["median_s"] / 1e9
        out.append(row)
    fa = rows.get("faiss", {}).get("median_s")
    for row in out:
        if fa and row.get("median_s"):
            row["speedup_vs_faiss"] = fa / row["median_s"]  # > 1: faster than faiss
    return out


def fmt_table(rows: list[dict], peak: float) -> str:
    head = f"{'N':>7} {'D':>5} {'k':>3}  {'contender':9} {'median s':>9} {'x faiss':>8} {'GFLOP/s':>8} " \
           f"{'% peak':>7} {'RSS+ MB':>8} {'runs':>4}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.get("median_s"):
            lines.append(f"{r['n']:>7} {r['d']:>5} {r['k']:>3}  {r['contender']:9} {'--':>9}  {r.get('error')}")
            continue
        note = ""
        if r["contender"] == "dn2_jax":
            note = f"first call {r['first_call_s']:.2f}s (compile {r['compile_s']:.2f}s), " \
                   f"steady recompiles {r['recompiles_steady']}"
        lines.append(
            f"{r['n']:>7} {r['d']:>5} {r['k']:>3}  {r['contender']:9} {r['median_s']:>9.3f} "
            f"{r.get('speedup_vs_faiss', float('nan')):>8.2f} {r['gflops']:>8.1f} {100 * r['gflops'] / peak:>6.1f}% "
            f"{r['rss_delta_mb']:>8.1f} {len(r['times_s']):>4}  {note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[5_000, 50_000, 200_000], help="bank sizes")
    p.add_argument("--d", type=int, nargs="+", default=[1280, 2048], help="feature dimensions")
    p.add_argument("--k", type=int, nargs="+", default=[2, 10], help="neighbours")
    p.add_argument("--m", type=int, default=10_000, help="queries")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per contender (budget permitting)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--peer-max-n", type=int, default=5_000,
                   help="run sklearn/PyOD (3-4x slower) only up to this bank size (50000: +8 min)")
    p.add_argument("--big-k-max-n", type=int, default=50_000,
                   help="run k > 2 only up to this bank size (k hardly changes the cost; saves ~5 min)")
    p.add_argument("--budget-s", type=float, default=780.0, help="soft time budget for the whole grid")
    p.add_argument("--quick", action="store_true", help="tiny grid (N=5k, D=1280, M=2k, k=2): seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "knn.json")
    a = p.parse_args(argv)
    keep_freed_memory()  # as the dn2 command does (dn2_jax/hostmem.py); before the CPU backend starts
    if a.quick:
        a.n, a.d, a.k, a.m, a.repeats = [5_000], [1280], [2], 2_000, 3

    compiles = CompileCounter()
    peak0 = matmul_peak()
    cases = [(n, d, k) for n in a.n for d in a.d for k in a.k if k <= 2 or n <= a.big_k_max_n]
    total_flops = sum(2.0 * a.m * n * d for n, d, _ in cases)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for n, d, k in cases:
        names = [c for c in a.contenders if c in ("dn2_jax", "faiss") or n <= a.peer_max_n]
        budget = a.budget_s * 2.0 * a.m * n * d / total_flops
        print(f"N={n} D={d} k={k} M={a.m}: {', '.join(names)}", file=sys.stderr, flush=True)
        rows += run_case(n, d, a.m, k, names, a.repeats, budget, compiles)
    peak1 = matmul_peak()
    peak = {name: max(peak0[name], peak1[name]) for name in peak0}
    ref_peak = max(peak.values())
    for r in rows:
        if r.get("gflops"):
            r["fraction_of_peak"] = r["gflops"] / ref_peak
    table = fmt_table(rows, ref_peak)
    print(f"float32 matmul peak (4096^2, best of 5, start/end of run): jnp HIGHEST {peak['jnp']:.1f} GFLOP/s, "
          f"numpy {peak['numpy']:.1f} GFLOP/s; % peak below uses {ref_peak:.1f}")
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s")
    result = {
        "command": "python benchmarks/knn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg(), "jax": jax.__version__, "numpy": np.__version__,
                    "blas": blas_info(),
                    "env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                             "OMP_NUM_THREADS", "XLA_FLAGS")}},
        "matmul_peak_gflops": peak,
        "rows": rows,
        "table": table,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
