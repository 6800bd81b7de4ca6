"""Scoring N images with a saved detector: how much of the wall time is spent outside the backbone forward.

    .venv/bin/python benchmarks/detector_score.py                  # 10k images, bank 500, Lite0 at 224
    nice -n 10 .venv/bin/python benchmarks/detector_score.py --n 2000
    .venv/bin/python benchmarks/detector_score.py --n 256 --bank 64 --input-size 64   # smoke run

A detector is fitted on --bank random images, saved and loaded again (as `dn2 score` does). The same N query
images then go through (1) the backbone alone: the detector's own jitted embedding function
(`Detector.embed_fn`, preprocessing + forward in one jit, the same batches), (2) `Detector.score` (embedding,
normalisation, kNN, first call: includes the kNN compilation for N queries), (3) `Detector.score` again and
(4) `Detector.query` (scores + p-values + decisions + neighbours). The backbone's compilation is done before
(1). (1), (3) and (4) are repeated in --rounds interleaved rounds and the fastest of each is kept (the machine
may be shared). Reported: seconds of each, and the share of each call's wall time spent outside the backbone,
(t_call - t_backbone) / t_call, in wall time and in process CPU time (the latter is steadier on a shared
machine). The goal (issue 13) is < 5%. Writes benchmarks/results/detector_score.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from dn2_jax import Detector
from dn2_jax.hostmem import keep_freed_memory

CPU = {}  # process CPU seconds (all threads) of each timed call, by call name, in call order


def _timed(fn, *args, name: str | None = None):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    if name is not None:
        CPU.setdefault(name, []).append(time.process_time() - c0)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="query images scored (default 10000)")
    p.add_argument("--bank", type=int, default=500, help="bank images the detector is fitted on")
    p.add_argument("--image-size", type=int, default=224, help="side of the (random uint8 RGB) images")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--input-size", type=int, default=None, help="backbone input size (default: its preset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (backbone, score, query each); min kept")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "detector_score.json"))
    args = p.parse_args(argv)
    keep_freed_memory()
    rng = np.random.default_rng(0)
    shape = (args.image_size, args.image_size, 3)
    bank = rng.integers(0, 256, (args.bank, *shape), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.n, *shape), dtype=np.uint8)
    det = Detector(backbone=args.backbone, input_size=args.input_size, batch_size=args.batch_size)
    t_fit, _ = _timed(det.fit, bank)
    with tempfile.TemporaryDirectory() as tmp:
        det.save(Path(tmp) / "det")
        t_load, det = _timed(Detector.load, Path(tmp) / "det")
    fn = det.embed_fn
    t_compile, _ = _timed(fn, queries[: args.batch_size])  # already compiled by fit: the same shape
    t_score_first, scores = _timed(det.score, queries)
    rounds = {"backbone": [], "score": [], "query": []}
    for _ in range(args.rounds):  # interleaved, so that all three see the same machine load
        rounds["backbone"].append(_timed(fn, queries, name="backbone")[0])
        t, again = _timed(det.score, queries, name="score")
        rounds["score"].append(t)
        t, q = _timed(det.query, queries, name="query")
        rounds["query"].append(t)
        assert np.array_equal(scores, again) and np.array_equal(q.scores, scores)
    t_backbone, t_score, t_query = (min(rounds[name]) for name in ("backbone", "score", "query"))
    share = {name: round((t - t_backbone) / t, 4) for name, t in
             (("score_first", t_score_first), ("score", t_score), ("query", t_query))}
    res = {
        "n": args.n, "bank": args.bank, "image_size": args.image_size, "backbone": args.backbone,
        "input_size": args.input_size, "batch_size": args.batch_size,
        "seconds": {"fit": round(t_fit, 3), "load": round(t_load, 3), "first_batch_after_load": round(t_compile, 3),
                    "backbone_only": round(t_backbone, 3), "score_first": round(t_score_first, 3),
                    "score": round(t_score, 3), "query": round(t_query, 3)},
        "rounds_seconds": {name: [round(t, 3) for t in ts] for name, ts in rounds.items()},
        "images_per_s": {"backbone_only": round(args.n / t_backbone, 1), "score": round(args.n / t_score, 1)},
        "share_outside_backbone": share,
        # The same share in process CPU time (all threads), less sensitive to other processes on the machine.
        "cpu_seconds": {name: [round(t, 3) for t in ts] for name, ts in CPU.items()},
        "share_outside_backbone_cpu": {name: round((min(CPU[name]) - min(CPU["backbone"])) / min(CPU[name]), 4)
                                       for name in ("score", "query")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()], "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp_out, out)
    return res


if __name__ == "__main__":
    main()
