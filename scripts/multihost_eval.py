#!/usr/bin/env python
"""DN2 one-class (semi-supervised) protocol on several hosts: each process embeds its share, the bank is
sharded over all devices of all processes, scores are exact kNN over the whole bank.

Per normal class c: bank = train images of class c, queries = the test images (anomalous iff class != c).
Process p embeds ``np.array_split(indices, P)[p]`` of both (on its local devices); its bank rows are placed
with :func:`dn2_jax.sharding.shard_bank`, the query features are all-gathered so every process holds all
queries, and :func:`dn2_jax.sharding.sharded_knn_score` returns the same scores on every process. Process 0
writes ``OUT/results.json`` (ROC-AUC per class, mean), identical to what one process computes.

Run it the same way in every process:
  python scripts/multihost_eval.py --coordinator HOST0:1234 --num-processes 2 --process-id {0,1} ...
or with no --coordinator on Cloud TPU / Slurm / Open MPI (auto-detected), or --single for one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", help="host:port of process 0 (omit on TPU/Slurm/MPI: auto-detected)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--single", action="store_true", help="one process: skip jax.distributed")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", help="as for `dn2 eval --weights`; 'random' = random init (smoke tests)")
    p.add_argument("--input-size", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise features before kNN, as `dn2 eval` does by default")
    p.add_argument("--classes", help="normal classes, e.g. 0,3 (default: all)")
    p.add_argument("--bank-size", type=int, help="train images per class (default: all)")
    p.add_argument("--test-size", type=int, help="test images (default: all)")
    p.add_argument("--approx-recall", type=float, help="TPU-KNN recall target (approximate on TPU only)")
    p.add_argument("--out", default="runs/multihost_eval")
    args = p.parse_args(argv)

    from dn2_jax.hostmem import keep_freed_memory
    from dn2_jax.sharding import initialize_distributed

    keep_freed_memory()  # XLA:CPU's per-batch scratch reused, not page-faulted in again (dn2_jax/hostmem.py)

    if not args.single:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from dn2_jax import protocols
    from dn2_jax.convert import load_variables
    from dn2_jax.data import load_dataset
    from dn2_jax.embedding import make_embed_fn
    from dn2_jax.knn import l2_normalize
    from dn2_jax.metrics import roc_auc
    from dn2_jax.models import init_random_variables
    from dn2_jax.sharding import data_mesh, shard_bank, sharded_knn_score

    pid, n_proc = jax.process_index(), jax.process_count()
    t_start = time.perf_counter()
    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    if args.weights == "random":
        variables = init_random_variables(args.backbone)
    else:
        variables = load_variables(args.backbone, args.weights)
    embed = make_embed_fn(args.backbone, variables, batch_size=args.batch_size, dtype=args.dtype,
                          mesh=data_mesh(jax.local_devices()), input_size=args.input_size)

    def embed_share(images, idx: np.ndarray) -> np.ndarray:
        """Features of this process's slice of ``idx`` (in order)."""
        mine = np.array_split(idx, n_proc)[pid]
        feats = embed(np.asarray(images[mine]))
        return np.asarray(l2_normalize(feats)) if args.normalize else feats

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

    n_classes = len(train.class_names)
    classes = range(n_classes) if args.classes is None else [int(c) for c in args.classes.split(",")]
    mesh = data_mesh()
    t0 = time.perf_counter()
    test_idx = np.arange(len(test))
    queries_all = gather(embed_share(test.images, test_idx), len(test_idx))
    per_class = []
    for c in classes:
        split = protocols.one_class(train.labels, test.labels, c, bank_size=args.bank_size,
                                    test_size=args.test_size, n_classes=n_classes)
        bank = shard_bank(embed_share(train.images, split.bank), mesh)
        scores = sharded_knn_score(queries_all[split.test], bank, args.k, approx_recall=args.approx_recall)
        auc = float(roc_auc(np.asarray(scores), split.test_anomaly))
        per_class.append({"class": train.class_names[c], "auc": auc, "bank": bank.size, "test": len(split.test)})
        if pid == 0:
            print(f"class {c} ({train.class_names[c]}): ROC-AUC {auc:.4f}", file=sys.stderr, flush=True)
    results = {
        "dataset": args.dataset, "backbone": args.backbone, "k": args.k, "dtype": args.dtype,
        "approx_recall": args.approx_recall, "normalize": args.normalize, "process_count": n_proc,
        "device_count": jax.device_count(),
        "devices": jax.devices()[0].device_kind, "mean_auc": float(np.mean([r["auc"] for r in per_class])),
        "per_class": per_class, "embed_and_score_s": time.perf_counter() - t0,
        "total_s": time.perf_counter() - t_start,
    }
    if pid == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(os.path.join(args.out, "results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
