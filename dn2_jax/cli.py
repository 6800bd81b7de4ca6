"""The ``dn2`` command: eval, embed, fit, score, convert.

User mistakes print one line, ``dn2: error: ...``, and exit with status 2; nothing half-written is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from dn2_jax.errors import DN2Error

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dn2-jax")
# The main job on the offline default: a subsample sized to finish in a few minutes on 2 CPU cores.
QUICK = {"bank_size": 100, "test_size": 1000}


def _classes(text: str | None) -> tuple[int, ...] | None:
    if text in (None, "all"):
        return None
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise DN2Error(f"--classes must be 'all' or comma-separated class indices, got '{text}'") from None


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0/1/2 (offline default), resnet18..152 (needs --weights), or pixels")
    p.add_argument("--weights", help="torchvision .pth/.safetensors or a `dn2 convert` output (ResNets)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--input-size", type=int, help="backbone input resolution (default: the backbone's preset)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dn2", description="Deep Nearest Neighbor Anomaly Detection (JAX)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="the paper's one-class protocol: ROC-AUC per normal class")
    p.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist, mnist, cifar10, cifar100, cifar100_fine, mvtec:PATH, folder:PATH, tfds:NAME")
    p.add_argument("--data-dir", help="where local dataset files or a prepared tfds data_dir live")
    _add_backbone_args(p)
    p.add_argument("--mode", default="semi", help="semi (default), unsupervised or group")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--classes", help="normal classes, e.g. 0,3,7 (default: all)")
    p.add_argument("--full", action="store_true", help="full train and test splits (default: a quick subsample)")
    p.add_argument("--bank-size", type=int, help="train images per class in the bank")
    p.add_argument("--test-size", type=int, help="test images (class-stratified)")
    p.add_argument("--contamination", type=float, default=0.0, help="unsupervised: share of anomalies in the bank")
    p.add_argument("--clean-fraction", type=float, default=0.5, help="unsupervised: share dropped by cleaning")
    p.add_argument("--group-size", type=int, default=3, help="group: images per set")
    p.add_argument("--train-groups", type=int, default=200, help="group: normal train sets")
    p.add_argument("--test-groups", type=int, default=200, help="group: test sets (half anomalous)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise features before kNN (default: on; --no-normalize for raw features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="output directory (results.json, roc.png, scores.png)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding stores reused across runs")
    p.add_argument("--no-cache", action="store_true", help="do not read or write embedding stores")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("embed", help="embed a dataset split into an embedding store (resumable)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir")
    p.add_argument("--class", dest="class_", type=int, help="only images of this class (a one-class bank)")
    _add_backbone_args(p)
    p.add_argument("--chunk-size", type=int, default=4096, help="images per atomically committed chunk")
    p.add_argument("--out", required=True, help="store directory")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("fit", help="save a decision threshold (leave-one-out, target FPR) with a bank store")
    p.add_argument("bank", help="bank store directory")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate on normal data")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images, a dataset split or a query store against a bank store")
    p.add_argument("bank", help="bank store directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (searched recursively)")
    src.add_argument("--dataset", help="a dataset name (with --split)")
    src.add_argument("--queries", help="a store of query embeddings")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--k", type=int, help="neighbours (default: the k saved by `dn2 fit`, else 2)")
    p.add_argument("--weights", help="backbone weights, when the bank's backbone needs them")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="write scores as JSON here (default: print)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("convert", help="convert a torchvision checkpoint to Flax variables (Orbax)")
    p.add_argument("src", help="torchvision .pth (zip or legacy) or .safetensors")
    p.add_argument("dst", help="output directory")
    p.add_argument("--backbone", required=True, help="resnet18, resnet34, resnet50, resnet101 or resnet152")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


# ------------------------------------------------------------------------------------------------- commands


def cmd_eval(args) -> None:
    from dn2_jax import evaluation

    quick = not args.full and args.bank_size is None and args.test_size is None
    sizes = QUICK if quick and not args.dataset.startswith("mvtec:") else {}
    cfg = evaluation.EvalConfig(
        dataset=args.dataset, backbone=args.backbone, weights=args.weights, mode=args.mode, k=args.k,
        classes=_classes(args.classes), bank_size=sizes.get("bank_size", args.bank_size),
        test_size=sizes.get("test_size", args.test_size), contamination=args.contamination,
        clean_fraction=args.clean_fraction, group_size=args.group_size, train_groups=args.train_groups,
        test_groups=args.test_groups, batch_size=args.batch_size, dtype=args.dtype, input_size=args.input_size,
        normalize=args.normalize, seed=args.seed, data_dir=args.data_dir,
        cache_dir=None if args.no_cache else args.cache_dir,
    )
    evaluation.validate_config(cfg)
    out_dir = evaluation.check_output_dir(args.out)
    if sizes:
        print(f"dn2 eval: quick run on a subsample ({sizes['bank_size']} train images per class, "
              f"{sizes['test_size']} test images, stratified); add --full for the paper's full protocol.")
    results, per_class = evaluation.evaluate(cfg)
    results["settings"]["quick_subsample"] = bool(sizes)
    for path in evaluation.write_outputs(out_dir, results, per_class):
        print(f"wrote {path}")


def _extractor(backbone: str, weights: str | None, batch_size: int, dtype: str = "float32", input_size=None):
    from dn2_jax.evaluation import EvalConfig, FeatureExtractor

    cfg = EvalConfig(backbone=backbone, weights=weights, batch_size=batch_size, dtype=dtype,
                     input_size=input_size)
    return FeatureExtractor(cfg)


def cmd_embed(args) -> None:
    from dn2_jax import store
    from dn2_jax.data import load_dataset

    store.check_store_path(args.out, "--out")  # before loading data or model
    ds = load_dataset(args.dataset, args.split, args.data_dir)
    idx = np.arange(len(ds))
    if args.class_ is not None:
        if not 0 <= args.class_ < len(ds.class_names):
            raise DN2Error(f"--class {args.class_} does not exist: {args.dataset} has classes "
                           f"0..{len(ds.class_names) - 1}")
        idx = np.flatnonzero(ds.labels == args.class_)
    ext = _extractor(args.backbone, args.weights, args.batch_size, args.dtype, args.input_size)
    meta = {**ext.identity, "dataset": ds.name, "split": ds.split, "class": args.class_,
            "compute_dtype": args.dtype, "input_size": args.input_size}
    images = ds.images[idx] if isinstance(ds.images, np.ndarray) else [ds.images[i] for i in idx]
    if isinstance(images, np.ndarray):
        st = store.extract_to_store(args.out, images, ext.embed_batch, metadata=meta, labels=ds.labels[idx],
                                    ids=idx, chunk_size=args.chunk_size, batch_size=args.batch_size)
    else:
        st = store.write_store(args.out, ext.embed_all(images), metadata=meta, labels=ds.labels[idx], ids=idx)
    print(f"wrote {args.out}: {st.count} embeddings of dim {st.dim} ({meta['backbone']})")


def cmd_fit(args) -> None:
    import dn2_jax as dn2
    from dn2_jax import store

    st = store.open_store(args.bank)
    bank = st.embeddings()
    value = float(dn2.threshold(bank, args.k, args.fpr))
    store.save_threshold(args.bank, value=value, k=args.k, fpr=args.fpr)
    print(f"threshold {value:.6g} (k={args.k}, target FPR {args.fpr}) saved with {args.bank}")


def cmd_score(args) -> None:
    import dn2_jax as dn2
    from dn2_jax import store
    from dn2_jax.data import IMAGE_EXTENSIONS, decode_image, load_dataset

    bank_store = store.open_store(args.bank)
    meta = bank_store.metadata
    saved = bank_store.threshold
    k = args.k or (saved or {}).get("k", 2)
    if args.queries:
        q_store = store.open_store(args.queries, expect={key: meta[key] for key in ("backbone", "fingerprint",
                                                                                    "preset")})
        queries, names = q_store.embeddings(), [str(i) for i in q_store.ids]
    else:
        if args.images:
            if not Path(args.images).is_dir():
                raise DN2Error(f"--images '{args.images}' is not a directory")
            paths = sorted(str(p) for p in Path(args.images).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not paths:
                raise DN2Error(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{args.images}'")
            images, names = [decode_image(p) for p in paths], paths
        else:
            ds = load_dataset(args.dataset, args.split, args.data_dir)
            images, names = ds.images, [str(i) for i in range(len(ds))]
        ext = _extractor(meta["backbone"], args.weights, args.batch_size, meta.get("compute_dtype", "float32"),
                         meta.get("input_size"))
        diffs = [f"{key}: bank has {meta[key]!r}, queries {ext.identity[key]!r}"
                 for key in ("backbone", "fingerprint", "preset") if meta[key] != ext.identity[key]]
        if diffs:
            raise DN2Error(f"bank '{args.bank}' and the query features differ ({'; '.join(diffs)}); "
                           "pass the --weights the bank was embedded with")
        queries = ext.embed_all(images)
    if queries.shape[1] != bank_store.dim:
        raise DN2Error(f"query features have dim {queries.shape[1]}, the bank {bank_store.dim}")
    d, _ = dn2.knn_chunks(queries, bank_store.iter_chunks(), k)
    scores = np.asarray(d).mean(1)
    rows = [{"id": n, "score": float(s)} for n, s in zip(names, scores, strict=True)]
    if saved:
        for r in rows:
            r["anomalous"] = r["score"] > saved["value"]
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"bank": args.bank, "k": k, "threshold": saved, "scores": rows}, indent=1))
        os.replace(tmp, args.out)
        print(f"wrote {len(rows)} scores to {args.out}")
    else:
        for r in rows:
            flag = "" if "anomalous" not in r else ("  ANOMALOUS" if r["anomalous"] else "  normal")
            print(f"{r['score']:.6g}  {r['id']}{flag}")


def cmd_convert(args) -> None:
    from dn2_jax.convert import convert_checkpoint

    convert_checkpoint(args.src, args.dst, args.backbone, overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def main(argv: list[str] | None = None) -> int:
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # before JAX starts its CPU backend; see dn2_jax/hostmem.py
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DN2Error as e:  # user mistakes: one line, no traceback
        print(f"dn2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dn2: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

