#!/usr/bin/env python
"""One prepared accelerator check for dn2-jax: throughput, achieved fraction of peak, GPU-vs-CPU agreement.

Sections (each timed, each failure recorded instead of aborting the run; JSON rewritten after each):
  device     the backend, device kind and memory.
  matmul     float32 matmul at Precision.HIGHEST (the reference "peak" for exact kNN) and, for context,
             DEFAULT precision (TF32 on NVIDIA) and bfloat16.
  knn        exact blocked kNN, N=1M bank, M=10k queries, D=2048, k=2 (a few block shapes), its FLOP/s
             (2*M*N*D per search) as a fraction of the measured HIGHEST matmul rate; the same through
             sharded_knn (1-D mesh over local devices) and the approx_min_k mode.
  agreement  scores of a small case on the accelerator and on the host CPU: embeddings (ResNet-50, random
             weights, HIGHEST precision) and DN2 scores, max relative difference and kNN index agreement.
  embed      images/s of ResNet-50 (random weights) and EfficientNet-Lite0 at 224x224, float32 and
             bfloat16, on device-resident uint8 batches; batch size doubled until it runs out of memory,
             stops paying (<5% gain) or hits --max-batch.

Usage:
  python scripts/gpu_check.py [--out DIR]        # full size; ~6 min on one H200 (deadline --budget-s)
  python scripts/gpu_check.py --tiny --out DIR   # seconds on a CPU: the same code paths at toy sizes
Results: DIR/gpu_check.json (DIR defaults to $OUT, else ./gpu_check_out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

FULL = dict(
    matmul_n=8192,
    knn_n=1_000_000,
    knn_m=10_000,
    knn_d=2048,
    knn_k=2,
    knn_blocks=[(4096, 1024), (16384, 2048), (32768, 4096)],
    agree_images=32,
    agree_bank=24,
    agree_size=224,
    embed_size=224,
    embed_batches=[128, 256, 512, 1024, 2048, 4096],
    embed_iters=10,
)
TINY = dict(
    matmul_n=256,
    knn_n=3000,
    knn_m=100,
    knn_d=64,
    knn_k=2,
    knn_blocks=[(512, 64), (1024, 128)],
    agree_images=6,
    agree_bank=5,
    agree_size=32,
    embed_size=32,
    embed_batches=[2, 4],
    embed_iters=2,
)
BACKBONES = ("resnet50", "efficientnet_lite0")


def _timeit(fn, *args, iters: int = 3) -> float:
    """Seconds per call of an already compiled ``fn``, best of ``iters`` (outputs block_until_ready)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "resourceexhausted" in text


# --------------------------------------------------------------------------------------------------------
# Sections.


def section_device(cfg) -> dict:
    dev = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    try:
        stats = dev.memory_stats() or {}
        info["bytes_limit"] = int(stats.get("bytes_limit", 0))
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    return info


def section_matmul(cfg) -> dict:
    n = cfg["matmul_n"]
    key_a, key_b = jax.random.split(jax.random.key(0))
    out = {"n": n}
    for name, dtype, precision in (
        ("f32_highest", jnp.float32, lax.Precision.HIGHEST),
        ("f32_default", jnp.float32, lax.Precision.DEFAULT),
        ("bf16", jnp.bfloat16, lax.Precision.DEFAULT),
    ):
        a = jax.random.normal(key_a, (n, n), dtype)
        b = jax.random.normal(key_b, (n, n), dtype)
        f = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p, preferred_element_type=jnp.float32))
        secs = _timeit(f, a, b, iters=5)
        out[name] = {"seconds": secs, "tflops": 2 * n**3 / secs / 1e12}
        del a, b
    return out


def section_knn(cfg, results) -> dict:
    from dn2_jax.knn import bank_center, blocked_knn, knn, squared_norms
    from dn2_jax.sharding import data_mesh, shard_bank, sharded_knn

    n, m, d, k = cfg["knn_n"], cfg["knn_m"], cfg["knn_d"], cfg["knn_k"]
    kb, kq = jax.random.split(jax.random.key(1))
    bank = jax.random.normal(kb, (n, d), jnp.float32)
    queries = jax.random.normal(kq, (m, d), jnp.float32)
    center = bank_center(bank)
    norms = squared_norms(bank, center)
    flops = 2.0 * m * n * d
    peak = results.get("matmul", {}).get("f32_highest", {}).get("tflops")
    out = {"n": n, "m": m, "d": d, "k": k, "flops_per_search": flops, "f32_highest_tflops": peak, "runs": []}
    no_exclude = jnp.full((m,), -1, jnp.int32)
    for block, qblock in cfg["knn_blocks"]:
        # The kernel itself: knn() also checks the inputs for NaN on the host, which is not search time.
        def search(q, b, s, block=block, qblock=qblock):
            return blocked_knn(q, b, s, center, no_exclude, k=k, block_size=block, query_block=qblock)

        try:
            secs = _timeit(search, queries, bank, norms, iters=2)
            tflops = flops / secs / 1e12
            out["runs"].append(
                {
                    "path": "knn",
                    "block_size": block,
                    "query_block": qblock,
                    "seconds": secs,
                    "queries_per_s": m / secs,
                    "tflops": tflops,
                    "fraction_of_f32_peak": tflops / peak if peak else None,
                }
            )
        except Exception as exc:  # noqa: BLE001 - record and go on with the next shape
            out["runs"].append({"path": "knn", "block_size": block, "query_block": qblock, "error": repr(exc)[:500]})
    best = min((r for r in out["runs"] if "seconds" in r), key=lambda r: r["seconds"], default=None)
    if best is not None:
        block, qblock = best["block_size"], best["query_block"]
        sb = shard_bank(bank, data_mesh(jax.local_devices()))
        # approx_min_k falls back to an exact (sort-based) top-k off TPU: time it on a tenth of the queries.
        m_approx = max(1, m // 10)
        for label, recall, mq in (("sharded_knn", None, m), ("sharded_knn_approx0.95", 0.95, m_approx)):
            try:
                secs = _timeit(
                    lambda q, r=recall: sharded_knn(q, sb, k, block_size=block, query_block=qblock, approx_recall=r),
                    queries[:mq],
                    iters=2,
                )
                mq_flops = 2.0 * mq * n * d
                out["runs"].append(
                    {
                        "path": label,
                        "devices": len(jax.local_devices()),
                        "block_size": block,
                        "query_block": qblock,
                        "queries": mq,
                        "seconds": secs,
                        "queries_per_s": mq / secs,
                        "tflops": mq_flops / secs / 1e12,
                        "fraction_of_f32_peak": mq_flops / secs / 1e12 / peak if peak else None,
                    }
                )
            except Exception as exc:  # noqa: BLE001
                out["runs"].append({"path": label, "error": repr(exc)[:500]})
        t0 = time.perf_counter()
        exact_i = np.asarray(knn(queries, bank, k, block_size=block, query_block=qblock, center=center,
                                    bank_sq_norms=norms)[1])
        out["public_knn_call_s"] = time.perf_counter() - t0  # includes input validation
        approx_i = np.asarray(
            sharded_knn(queries[:m_approx], sb, k, block_size=block, query_block=qblock, approx_recall=0.95)[1]
        )
        exact_i = exact_i[:m_approx]
        from dn2_jax.sharding import knn_recall

        out["approx_recall_vs_exact"] = knn_recall(approx_i, exact_i)
    return out


def _backbone(name: str, dtype, size: int, batch_size: int, devices):
    """An embed function uint8 (B, size, size, 3) -> (B, D) features, random weights, on ``devices``."""
    from dn2_jax.embedding import make_embed_fn
    from dn2_jax.models import get_backbone, init_random_variables
    from dn2_jax.sharding import data_mesh

    spec = get_backbone(name)
    variables = init_random_variables(spec, seed=0)
    return make_embed_fn(spec, variables, batch_size=batch_size, dtype=dtype, mesh=data_mesh(devices), input_size=size)


def section_agreement(cfg) -> dict:
    from dn2_jax.knn import knn_score

    cpu = jax.devices("cpu")
    if jax.default_backend() == "cpu":
        accel = cpu
    else:
        accel = jax.devices()
    size, n_img, n_bank = cfg["agree_size"], cfg["agree_images"], cfg["agree_bank"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_img, size, size, 3), dtype=np.uint8)
    feats = {}
    with jax.default_matmul_precision("highest"):
        for label, devs in (("accelerator", accel[:1]), ("cpu", cpu[:1])):
            embed = _backbone("resnet50", jnp.float32, size, n_img, devs)
            feats[label] = np.asarray(embed(images), np.float32)
    out = {"images": n_img, "bank": n_bank, "size": size}
    fa, fc = feats["accelerator"], feats["cpu"]
    out["feature_max_rel_diff"] = float(np.abs(fa - fc).max() / max(np.abs(fc).max(), 1e-30))
    scores = {}
    for label, dev in (("accelerator", accel[0]), ("cpu", cpu[0])):
        f = jax.device_put(feats["cpu"], dev)  # same features, different kNN device
        scores[label] = np.asarray(knn_score(f[n_bank:], f[:n_bank], 2))
        g = jax.device_put(feats[label], dev)  # end to end
        scores[label + "_e2e"] = np.asarray(knn_score(g[n_bank:], g[:n_bank], 2))
    sa, sc = scores["accelerator"], scores["cpu"]
    out["knn_score_max_rel_diff"] = float(np.abs(sa - sc).max() / max(np.abs(sc).max(), 1e-30))
    ea, ec = scores["accelerator_e2e"], scores["cpu_e2e"]
    out["e2e_score_max_rel_diff"] = float(np.abs(ea - ec).max() / max(np.abs(ec).max(), 1e-30))
    out["e2e_score_rank_equal"] = bool((np.argsort(ea) == np.argsort(ec)).all())
    return out


def section_embed(cfg, deadline: float, max_batch: int, backbones, dtypes, until_oom: bool) -> dict:
    size, iters = cfg["embed_size"], cfg["embed_iters"]
    out = {"size": size, "devices": jax.local_device_count(), "runs": []}
    rng = np.random.default_rng(0)
    for name in backbones:
        for dtype in dtypes:
            best = None
            for batch in [b for b in cfg["embed_batches"] if b <= max_batch]:
                if time.monotonic() > deadline:
                    out["runs"].append(
                        {"backbone": name, "dtype": jnp.dtype(dtype).name, "batch": batch, "skipped": "time budget"}
                    )
                    break
                row = {"backbone": name, "dtype": jnp.dtype(dtype).name, "batch": batch}
                try:
                    embed = _backbone(name, dtype, size, batch, jax.local_devices())
                    host = rng.integers(0, 256, (embed.batch_size, size, size, 3), dtype=np.uint8)
                    t0 = time.perf_counter()
                    embed(host)  # compiles
                    row["first_call_s"] = time.perf_counter() - t0
                    # Device compute only: device-resident uint8 batch through the jitted forward.
                    images = jax.device_put(host, NamedSharding(embed.mesh, P("data")))
                    secs = _timeit(embed._forward, embed._variables, images, iters=iters)
                    row.update(seconds_per_batch=secs, images_per_s=embed.batch_size / secs)
                    # End to end from host numpy (transfer in, features back).
                    secs_e2e = _timeit(embed, host, iters=max(1, iters // 2))
                    row["images_per_s_from_host"] = embed.batch_size / secs_e2e
                except Exception as exc:  # noqa: BLE001 - OOM ends the search, anything else is recorded
                    row["error"] = "out of memory" if _is_oom(exc) else repr(exc)[:500]
                    out["runs"].append(row)
                    break
                out["runs"].append(row)
                if not until_oom and best is not None and row["images_per_s"] < 1.05 * best:
                    break
                best = max(best or 0.0, row["images_per_s"])
    return out


# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="result directory")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU dry run of every code path)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this")
    parser.add_argument("--max-batch", type=int, default=4096, help="upper bound of the batch-size search")
    parser.add_argument("--until-oom", action="store_true", help="double the batch until OOM, not plateau")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated registry names")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument("--sections", default="device,matmul,knn,agreement,embed", help="comma-separated")
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    start = time.monotonic()
    deadline = start + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    results: dict = {"tiny": args.tiny, "config": cfg, "timings_s": {}, "errors": {}}

    def write():
        results["elapsed_s"] = time.monotonic() - start
        path.write_text(json.dumps(results, indent=1, default=str))

    sections = {
        "device": lambda: section_device(cfg),
        "matmul": lambda: section_matmul(cfg),
        "knn": lambda: section_knn(cfg, results),
        "agreement": lambda: section_agreement(cfg),
        "embed": lambda: section_embed(
            cfg,
            deadline,
            args.max_batch,
            args.backbones.split(","),
            [jnp.dtype(t) for t in args.dtypes.split(",")],
            args.until_oom,
        ),
    }
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"unknown section {name!r}; choose from {', '.join(sections)}")
        if time.monotonic() > deadline:
            results["errors"][name] = "skipped: time budget"
            continue
        t0 = time.monotonic()
        try:
            results[name] = sections[name]()
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
            results["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
        results["timings_s"][name] = time.monotonic() - t0
        write()
        print(f"[gpu_check] {name}: {results['timings_s'][name]:.1f}s", file=sys.stderr, flush=True)
    write()
    print(path)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
