"""Features for the cleaning / group-pooling study (issue 14): embeds a seeded subsample of a dataset once.

Default backbone (EfficientNet-Lite0 at its 224x224 preset), L2-normalised features, cached in embedding
stores under --cache (dn2_jax.store.extract_to_store via dn2_jax.evaluation.FeatureExtractor), and written
as one ``.npz`` (train features/labels/ids, test features/labels/ids) that the study scripts read.

Subsample: ``--train-per-class`` train images per class (seeded, numpy default_rng(seed)) and a
class-stratified ``--test`` test images (dn2_jax.protocols.stratified_subsample); 0 = the whole split.

    nice -n 10 python scripts/study_features.py --dataset fashion_mnist --train-per-class 600 --test 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def subsample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted int64 indices: a seeded ``per_class`` of each class (all of a class if it has fewer; 0 = all)."""
    if per_class <= 0:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())), replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def features_path(cache: str, dataset: str, train_per_class: int, test: int, seed: int) -> Path:
    return Path(cache) / f"{dataset}-tr{train_per_class}-te{test}-s{seed}.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache", default="/tmp/dn2-study")
    args = ap.parse_args()

    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # as the dn2 command does: without it XLA:CPU page-faults its scratch in every batch
    from dn2_jax.data import load_dataset
    from dn2_jax.evaluation import EvalConfig, FeatureExtractor
    from dn2_jax.protocols import stratified_subsample

    out = features_path(args.cache, args.dataset, args.train_per_class, args.test, args.seed)
    cfg = EvalConfig(dataset=args.dataset, batch_size=args.batch_size, cache_dir=args.cache)
    extract = FeatureExtractor.from_config(cfg, cache_dir=args.cache)
    arrays = {}
    for split in ("train", "test"):
        ds = load_dataset(args.dataset, split)
        if split == "train":
            ids = subsample_per_class(ds.labels, args.train_per_class, args.seed)
        else:
            ids = np.arange(len(ds.labels)) if args.test <= 0 else stratified_subsample(ds.labels, args.test,
                                                                                          seed=args.seed)
        t0 = time.perf_counter()
        feats = np.asarray(extract(ds, ids), np.float32)  # raw features, cached in a store under --cache
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)  # L2, as dn2 eval's default
        print(f"{args.dataset} {split}: {len(ids)} images embedded in {time.perf_counter() - t0:.0f} s", flush=True)
        arrays.update({f"{split}_x": feats, f"{split}_y": ds.labels[ids].astype(np.int64),
                       f"{split}_ids": ids})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays written by this script: train_x/_y/_ids and test_x/_y/_ids."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def validation_split(labels: np.ndarray, held_out: float = 1 / 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Carves a validation split out of TRAIN: per class, a seeded ``round(held_out * n_c)`` of the class's
    train images become the validation test set, the rest the bank pool (banks, contaminants and train sets
    are drawn from the pool only). Returns (pool, val) sorted int64 positions into ``labels``."""
    rng = np.random.default_rng(seed + 1_000_003)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.choice(idx, int(round(held_out * len(idx))), replace=False))
    val = np.sort(np.concatenate(val))
    pool = np.setdiff1d(np.arange(len(labels)), val)
    return pool.astype(np.int64), val.astype(np.int64)


def split_views(f: dict[str, np.ndarray], phase: str, seed: int = 0):
    """(bank_x, bank_y, query_x, query_y) for a phase: 'val' = (train pool, held-out train), 'test' = (all the
    train subsample, the test subsample)."""
    if phase == "val":
        pool, val = validation_split(f["train_y"], seed=seed)
        return f["train_x"][pool], f["train_y"][pool], f["train_x"][val], f["train_y"][val]
    return f["train_x"], f["train_y"], f["test_x"], f["test_y"]
