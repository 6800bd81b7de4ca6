#!/usr/bin/env python
"""DN2 one-class (semi-supervised) protocol on several hosts: each process embeds its share, the bank is
sharded over all devices of all processes, scores are exact kNN over the whole bank.

A thin launcher over `dn2_jax.evaluation`: the same settings (`EvalConfig`, flags derived as in `dn2 eval`),
the same splits (`one_class_splits`), the same normalisation and the same outputs (`results_dict`,
`write_outputs`: results.json, roc.png, scores.png). What differs is only where the work runs: process p
embeds ``np.array_split(indices, P)[p]`` of the bank and of the queries on its local devices; bank rows are
placed with :func:`dn2_jax.sharding.shard_bank`, query features are all-gathered, and
:func:`dn2_jax.sharding.sharded_knn_score` returns the same scores on every process. Process 0 writes OUT.

Run it the same way in every process:
  python scripts/multihost_eval.py --coordinator HOST0:1234 --num-processes 2 --process-id {0,1} ...
or with no --coordinator on Cloud TPU / Slurm / Open MPI (auto-detected), or --single for one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

SETTINGS = ("dataset", "data_dir", "backbone", "weights", "input_size", "dtype", "batch_size", "k", "normalize",
            "classes", "bank_size", "test_size", "seed")


def main(argv: list[str] | None = None) -> int:
    from dn2_jax.cli import add_config_flags, given_settings
    from dn2_jax.evaluation import EvalConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", help="host:port of process 0 (omit on TPU/Slurm/MPI: auto-detected)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--single", action="store_true", help="one process: skip jax.distributed")
    add_config_flags(p, EvalConfig, names=SETTINGS)  # --weights random: random init (smoke tests)
    p.add_argument("--approx-recall", type=float, help="TPU-KNN recall target (approximate on TPU only)")
    p.add_argument("--out", default="runs/multihost_eval")
    args = p.parse_args(argv)
    # batch_size is per process; full splits unless --bank-size / --test-size
    cfg = EvalConfig(**{"batch_size": 256, **given_settings(args, EvalConfig)})

    from dn2_jax.evaluation import check_output_dir, validate_config

    validate_config(cfg)
    out_dir = check_output_dir(args.out)

    from dn2_jax.hostmem import keep_freed_memory
    from dn2_jax.sharding import initialize_distributed

    keep_freed_memory()  # XLA:CPU's per-batch scratch reused, not page-faulted in again (dn2_jax/hostmem.py)
    if not args.single:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    results = run(cfg, args.approx_recall)
    if results is not None:
        from dn2_jax.evaluation import write_outputs

        print(write_outputs(out_dir, *results)[0])
    return 0


def run(cfg, approx_recall: float | None = None):
    """The one-class protocol of `cfg` over every process; returns (results dict, per-class results) on process
    0, None elsewhere."""
    import jax

    from dn2_jax.convert import load_variables
    from dn2_jax.data import load_dataset
    from dn2_jax.embedding import make_embed_fn
    from dn2_jax.evaluation import ClassResult, one_class_splits, results_dict, select_classes
    from dn2_jax.knn import l2_normalize
    from dn2_jax.metrics import roc_auc
    from dn2_jax.models import init_random_variables
    from dn2_jax.sharding import data_mesh, shard_bank, sharded_knn_score

    pid, n_proc = jax.process_index(), jax.process_count()
    t_start = time.perf_counter()
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    splits = one_class_splits(cfg, train, test, select_classes(cfg, train))
    if cfg.weights == "random":
        variables = init_random_variables(cfg.backbone)
    else:
        variables = load_variables(cfg.backbone, cfg.weights)
    embed = make_embed_fn(cfg.backbone, variables, batch_size=cfg.batch_size, dtype=cfg.dtype,
                          mesh=data_mesh(jax.local_devices()), input_size=cfg.input_size)

    def embed_share(images, idx: np.ndarray) -> np.ndarray:
        """Features of this process's slice of ``idx`` (in order), normalised as `dn2 eval` does."""
        feats = embed(np.asarray(images[np.array_split(idx, n_proc)[pid]]))
        return np.asarray(l2_normalize(feats)) if cfg.normalize else feats

    def gather(local: np.ndarray, total: int) -> np.ndarray:
        """Concatenation over processes of their (uneven) array_split slices: (total, D) on every process."""
        if n_proc == 1:
            return local
        from jax.experimental import multihost_utils

        width = -(-total // n_proc)
        padded = np.zeros((width, local.shape[1]), local.dtype)
        padded[: len(local)] = local
        full = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
        sizes = [len(s) for s in np.array_split(np.arange(total), n_proc)]
        return np.concatenate([full[i * width : i * width + n] for i, n in enumerate(sizes)])

    mesh = data_mesh()
    t0 = time.perf_counter()
    pool = np.unique(np.concatenate([s.test for s in splits.values()]))
    queries = gather(embed_share(test.images, pool), len(pool))
    per_class = []
    for name, split in splits.items():
        bank = shard_bank(embed_share(train.images, split.bank), mesh)
        scores = sharded_knn_score(queries[np.searchsorted(pool, split.test)], bank, cfg.k,
                                   approx_recall=approx_recall)
        scores = np.asarray(scores, np.float64)
        auc = float(roc_auc(np.asarray(scores, np.float32), split.test_anomaly))
        per_class.append(ClassResult(name, auc, scores, split.test_anomaly, len(split.bank)))
        if pid == 0:
            print(f"{name}: ROC-AUC {auc:.4f}", file=sys.stderr, flush=True)
    timings = {"embed_and_score_s": round(time.perf_counter() - t0, 3),
               "total_s": round(time.perf_counter() - t_start, 3)}
    if pid != 0:
        return None
    results = results_dict(dataclasses.asdict(cfg), per_class, timings)
    results.update({
        "normalize": cfg.normalize, "approx_recall": approx_recall, "process_count": n_proc,
        "device_count": jax.device_count(), "devices": jax.devices()[0].device_kind,
    })
    return results, per_class


if __name__ == "__main__":
    sys.exit(main())
