"""The ``dn2`` command: eval, embed, fit, score, adapt, convert.

Argument parsing and calls into library objects only. The flags of settings are derived from the settings
dataclasses (`EvalConfig`, `DetectorConfig`: name, type, help and choices from each field), and a flag the
user did not pass keeps the dataclass default; a flag that does not apply to the chosen mode or source is an
error. User mistakes print one line, ``dn2: error: ...``, and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import types
import typing
from typing import Any

from dn2_jax.errors import DN2Error

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dn2-jax")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one `dn2: error:` line (exit 2), like every other user mistake."""

    def error(self, message: str):
        raise DN2Error(f"{self.prog.removeprefix('dn2').strip() or 'dn2'}: {message}")


def _classes(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'all' or comma-separated class indices, got '{text}'") from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated names, got '{text}'")
    return names


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...] | None = None,
                     skip: tuple[str, ...] = (), default: str | None = None) -> None:
    """One flag per field of dataclass `cls` (all, or `names`), typed and documented from the field; the
    default is left out of the namespace, so `given_settings` tells what the user passed. `default` replaces
    the field defaults shown in the help (e.g. "the detector's")."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (names is not None and f.name not in names) or f.name in skip:
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        shown = default if default is not None else (None if f.default is None else f.default)
        note = "" if shown is None else f" (default: {shown})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", "") + note)
        if kind is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is str:
            kw["type"], kw["metavar"] = _names, "NAME,NAME,..."
        elif typing.get_origin(kind) is tuple:
            kw["type"], kw["metavar"] = _classes, "C,C,..."
        else:
            kw["type"] = kind
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        p.add_argument(_flag(f.name), **kw)


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user passed on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _refuse(given, names, why: str) -> None:
    if bad := [n for n in names if n in given]:
        raise DN2Error(f"{', '.join(_flag(n) for n in bad)} {why}")


def _add_source(p: argparse.ArgumentParser, split: str, queries: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (searched recursively); rows are named by path")
    src.add_argument("--dataset", help="a dataset: fashion_mnist, mnist, cifar10, mvtec:PATH, folder:PATH, tfds:NAME")
    if queries:
        src.add_argument("--queries", help="an embedding store (`dn2 embed` output) of the images' features")
    else:
        src.add_argument("--store", help="an embedding store (`dn2 embed` output) of normal images")
    _add_skip_flag(p)
    p.add_argument("--split", default=argparse.SUPPRESS, help=f"dataset split (default: {split})")
    p.add_argument("--classes", type=_classes, default=argparse.SUPPRESS, metavar="C,C,...",
                   help="only images of these classes (default: all)")
    p.add_argument("--data-dir", default=argparse.SUPPRESS, help="where local dataset files live")


def _add_skip_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-images", action="store_true", default=argparse.SUPPRESS,
                   help="leave out image files that cannot be decoded (listed on stderr) instead of stopping at the "
                   "first one")


def _on_error(args) -> str:
    return "skip" if hasattr(args, "skip_bad_images") else "raise"


def _report_skipped(command: str, skipped) -> None:
    """Count and paths of the image files left out (--skip-bad-images), on stderr."""
    if skipped:
        lines = [f"dn2 {command}: skipped {len(skipped)} image file{'s' * (len(skipped) > 1)} that could not be "
                 "decoded:"] + [f"  {reason}" if path in reason else f"  {path}: {reason}" for path, reason in skipped]
        print("\n".join(lines), file=sys.stderr)


def _source(args, split: str):
    from dn2_jax import scoring

    extra = [n for n in ("split", "classes", "data_dir") if hasattr(args, n)]
    if args.dataset is None and extra:
        raise DN2Error(f"{', '.join(_flag(n) for n in extra)} only apply with --dataset")
    if args.images is not None:
        return scoring.folder_source(args.images, on_error=_on_error(args))
    if args.dataset is not None:
        return scoring.dataset_source(args.dataset, getattr(args, "split", split), getattr(args, "classes", None),
                                      getattr(args, "data_dir", None), on_error=_on_error(args))
    if hasattr(args, "skip_bad_images"):
        raise DN2Error("--skip-bad-images only applies with --images or --dataset (a store holds features)")
    return scoring.store_source(getattr(args, "store", None) or args.queries)


def build_parser() -> argparse.ArgumentParser:
    from dn2_jax.detector import DetectorConfig
    from dn2_jax.distributed import ProcessConfig
    from dn2_jax.evaluation import EvalConfig

    parser = _Parser(prog="dn2", description="Deep Nearest Neighbor Anomaly Detection (JAX)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="the paper's protocols: ROC-AUC per normal class")
    add_config_flags(p, EvalConfig, skip=("quick", "cache_dir"))
    p.add_argument("--full", action="store_true", default=argparse.SUPPRESS,
                   help="full train and test splits (default: a quick subsample; semi and unsupervised modes)")
    p.add_argument("--out", default="runs/eval", help="output directory (results.json, roc.png, scores.png)")
    p.add_argument("--cache-dir", default=argparse.SUPPRESS, help=f"embedding stores and compiled programs reused "
                   f"across runs "
                   f"(default: {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", default=argparse.SUPPRESS,
                   help="do not read or write embedding stores or compiled programs")
    add_config_flags(p, ProcessConfig)
    p.set_defaults(func=cmd_eval)

    features = ("backbone", "weights", "input_size", "dtype", "batch_size")
    p = sub.add_parser("embed", help="embed a dataset split into an embedding store (resumable)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir")
    p.add_argument("--class", dest="class_", type=int, help="only images of this class (a one-class bank)")
    _add_skip_flag(p)
    add_config_flags(p, DetectorConfig, names=features)
    p.add_argument("--chunk-size", type=int, default=4096, help="images per atomically committed chunk")
    p.add_argument("--out", required=True, help="store directory")
    add_config_flags(p, ProcessConfig)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("fit", help="fit a detector to normal images and save it (a directory)")
    _add_source(p, "train", queries=False)
    add_config_flags(p, DetectorConfig)
    p.add_argument("--out", required=True, help="detector directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing detector at --out")
    add_config_flags(p, ProcessConfig)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("score", help="score images with a saved detector: score, p-value, decision, neighbours")
    p.add_argument("detector", help="a detector directory written by `dn2 fit`")
    _add_source(p, "test", queries=True)
    add_config_flags(p, DetectorConfig, names=("k", "fpr", "weights", "batch_size"), default="the detector's")
    p.add_argument("--out", help="write the report here: .json or .csv (default: print)")
    p.add_argument("--gallery", help="PNG: the most anomalous images beside their nearest normal images")
    p.add_argument("--maps", help="a new directory: one heat-map overlay PNG per image (patch-level detectors: "
                   "dn2 fit --level patch)")
    p.add_argument("--top", type=int, default=argparse.SUPPRESS, help="rows of --gallery (default: 8)")
    add_config_flags(p, ProcessConfig)
    p.set_defaults(func=cmd_score)

    from dn2_jax.adapt import AdaptConfig

    p = sub.add_parser("adapt", help="adapt a backbone to normal images (PANDA / Mean-Shifted) -> a weights directory")
    _add_source(p, "train", queries=False)
    add_config_flags(p, DetectorConfig, names=("backbone", "weights", "input_size"))
    add_config_flags(p, AdaptConfig, skip=("freeze",))
    p.add_argument("--out", required=True, help="weights directory to write (then: --weights OUT anywhere)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights directory at --out")
    p.add_argument("--plot", help="PNG of the training loss per epoch")
    p.add_argument("--checkpoint-dir", help="per-epoch training state, resumed by the same command after a kill "
                   "(default: a hidden folder beside --out, removed when done)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("convert", help="convert a torchvision checkpoint to Flax variables (Orbax)")
    p.add_argument("src", help="torchvision .pth (zip or legacy) or .safetensors")
    p.add_argument("dst", help="output directory")
    p.add_argument("--backbone", required=True, help="resnet18, resnet34, resnet50, resnet101 or resnet152")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


# ------------------------------------------------------------------------------------------------- commands


def cmd_eval(args) -> None:
    from dn2_jax import distributed, evaluation

    given = {k: v for k, v in given_settings(args, evaluation.EvalConfig).items() if k not in ("quick", "cache_dir")}
    mode = given.get("mode", "semi")
    if mode in evaluation.MODES:
        for name in given:
            if not evaluation.applies(name, mode):
                modes = evaluation.EvalConfig.__dataclass_fields__[name].metadata["modes"]
                raise DN2Error(f"{_flag(name)} applies to --mode {' or '.join(modes)}, not --mode {mode}")
        if mode == "group" and hasattr(args, "full"):
            raise DN2Error("--full applies to --mode semi or unsupervised; group sizes are --train-groups and "
                           "--test-groups")
    if given.get("dataset", "").startswith("mvtec:"):
        _refuse(given, ("classes", "bank_size", "test_size"), "do not apply to an MVTec-style folder (its "
                "train/good is the bank and every test image is scored)")
    _check_level(given)
    pool = given.get("group_pool", evaluation.EvalConfig.group_pool)
    if "prototypes" in given and "hist" not in pool.split("+"):
        raise DN2Error(f"--prototypes applies to a --group-pool with 'hist', not --group-pool {pool}")
    if hasattr(args, "no_cache") and hasattr(args, "cache_dir"):
        raise DN2Error("--no-cache and --cache-dir contradict each other; pass one")
    cache = None if hasattr(args, "no_cache") else os.path.abspath(getattr(args, "cache_dir", DEFAULT_CACHE))
    cfg = evaluation.EvalConfig(**given, quick=not hasattr(args, "full"), cache_dir=cache)
    evaluation.validate_config(cfg)
    cfg.detector_config()  # settings the detector refuses (e.g. --input-size with pixels), before any work
    out_dir = evaluation.check_output_dir(args.out)
    results, per_class = evaluation.evaluate(cfg)
    _report_skipped("eval", [(s["path"], s["reason"]) for s in results["skipped_images"]])
    if not distributed.is_writer():
        return
    for path in evaluation.write_outputs(out_dir, results, per_class):
        print(f"wrote {path}")
    if cfg.level == "patch":
        from dn2_jax.evaluation.patch import write_maps

        for path in write_maps(out_dir, per_class):
            print(f"wrote {path}")
    if cfg.adapt is not None:
        from dn2_jax.adapt import plot_history
        from dn2_jax.evaluation.adapted import histories

        print(f"wrote {plot_history(histories(results), out_dir / 'adaptation.png')}")


def _check_level(given: dict[str, Any]) -> None:
    """Patch settings only with --level patch; image-level settings (normalisation, cleaning) not with it."""
    from dn2_jax.detector import CLEAN_OPTIONS, PATCH_OPTIONS

    if given.get("level", "image") == "patch":
        _refuse(given, ("normalize", "clean", *CLEAN_OPTIONS), "applies to --level image only")
    else:
        _refuse(given, PATCH_OPTIONS, "applies to --level patch only")


def cmd_embed(args) -> None:
    from dn2_jax import store
    from dn2_jax.detector import DetectorConfig
    from dn2_jax.evaluation import embed_split

    store.check_store_path(args.out, "--out")  # before loading data or model
    config = DetectorConfig(**given_settings(args, DetectorConfig))
    st = embed_split(args.out, config, args.dataset, args.split, data_dir=args.data_dir, class_=args.class_,
                     chunk_size=args.chunk_size, on_error=_on_error(args))
    skipped = st.metadata.get("skipped") or []
    _report_skipped("embed", [(item["path"], item["reason"]) for item in skipped])
    print(f"wrote {args.out}: {st.count} embeddings of dim {st.dim} ({st.metadata['backbone']})")


def cmd_fit(args) -> None:
    from dn2_jax import scoring
    from dn2_jax.detector import DetectorConfig

    given = given_settings(args, DetectorConfig)
    _check_level(given)
    if args.store is not None and given.get("level") == "patch":
        raise DN2Error("--level patch needs the images (--images or --dataset); --store holds image features")
    if args.store is not None:
        config = scoring.store_config(args.store, **given)
    else:
        config = DetectorConfig(**given)
    scoring.check_new_output(args.out, "--out", overwrite=args.overwrite)
    source = _source(args, "train")
    _report_skipped("fit", source.skipped)
    if config.level == "patch":
        from dn2_jax.patch_detector import fit_patch_detector

        det = fit_patch_detector(config, source, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: patch bank of {det.bank_size} patches from {det.images} normal images "
              f"({det.patch_fn.grid}x{det.patch_fn.grid} patches of {det.patch_fn.feature_dim} dims each, layers "
              f"{','.join(det.patch_fn.layers)}), k={det.k}, threshold {det.threshold:.6g} (target FPR "
              f"{det.config.fpr})")
        return
    det = scoring.fit_detector(config, source, args.out, overwrite=args.overwrite)
    cleaned = "" if det.config.clean == "none" else f" (cleaning '{det.config.clean}' kept {det.bank_size} of " \
        f"{len(source)})"
    estimate = "" if det.contamination is None else f", estimated contamination {det.contamination:.3f}"
    print(f"wrote {args.out}: {det.bank_size} normal images{cleaned}, k={det.k}, threshold "
          f"{det.threshold:.6g} (target FPR {det.config.fpr}){estimate}")


def cmd_score(args) -> None:
    from dn2_jax import distributed, scoring
    from dn2_jax.detector import DetectorConfig

    if args.out is not None:
        scoring.check_new_output(args.out, "--out", suffixes=scoring.REPORT_FORMATS)
    if args.gallery is not None:
        scoring.check_new_output(args.gallery, "--gallery", suffixes=(".png",))
    elif hasattr(args, "top"):
        raise DN2Error("--top only applies with --gallery")
    if args.gallery is not None and args.queries is not None:
        raise DN2Error("--gallery needs the images themselves (--images or --dataset), not --queries")
    if args.maps is not None:
        from dn2_jax.detector import Detector
        from dn2_jax.fileio import check_writable

        if Detector.saved_config(args.detector).level != "patch":
            raise DN2Error(f"--maps needs a patch-level detector (dn2 fit --level patch); '{args.detector}' scores "
                           "whole images")
        if args.queries is not None:
            raise DN2Error("--maps needs the images themselves (--images or --dataset), not --queries")
        check_writable(args.maps, "dir", overwrite=False, parents=True, what="--maps")
    det, note = scoring.load_detector(args.detector, **given_settings(args, DetectorConfig))
    if note:
        print(f"dn2 score: {note}", file=sys.stderr)
    source = _source(args, "test")
    _report_skipped("score", source.skipped)
    if args.maps is not None:
        from dn2_jax.patch_detector import score_with_maps

        report = score_with_maps(det, source, args.maps)
        print(f"wrote {len(report.names)} maps to {args.maps}")
    else:
        report = scoring.score_source(det, source)
    if not distributed.is_writer():
        return
    if args.out is not None:
        scoring.write_report(report, args.out, detector=str(args.detector))
        print(f"wrote {len(report.names)} scores to {args.out}")
    if args.gallery is not None:
        scoring.gallery(report, args.gallery, top=getattr(args, "top", 8), data_dir=getattr(args, "data_dir", None))
        print(f"wrote {args.gallery}")
    text = scoring.format_report(report)
    print(text if args.out is None else text.splitlines()[-1])


def cmd_adapt(args) -> None:
    import numpy as np

    from dn2_jax import adapt
    from dn2_jax.detector import DetectorConfig
    from dn2_jax.fileio import check_writable

    features = given_settings(args, DetectorConfig)
    cfg = adapt.AdaptConfig(**given_settings(args, adapt.AdaptConfig))
    if args.store is not None:
        raise DN2Error("--store holds features; adaptation needs the images: pass --images or --dataset")
    backbone = features.get("backbone", DetectorConfig.__dataclass_fields__["backbone"].default)
    if backbone == "pixels":
        raise DN2Error("--backbone pixels has no weights to adapt; choose a network backbone")
    check_writable(args.out, "dir", overwrite=args.overwrite, parents=True, what="--out")
    if args.plot is not None:
        check_writable(args.plot, "file", what="--plot")
    source = _source(args, "train")
    images = source.images
    if not isinstance(images, np.ndarray):
        if len({np.shape(im) for im in images}) > 1:
            raise DN2Error("adaptation needs images of one size; this source mixes sizes")
        images = np.stack(images)
    path, history = adapt.adapt_to_weights(images, backbone, args.out, cfg, weights=features.get("weights"),
                                           input_size=features.get("input_size"),
                                           checkpoint_dir=args.checkpoint_dir, overwrite=args.overwrite)
    if args.plot is not None:
        print(f"wrote {adapt.plot_history({cfg.method: history}, args.plot)}")
    last = history[-1]
    print(f"wrote {path}: {backbone} adapted with {cfg.method} on {len(images)} images, {last['epoch']} epochs, "
          f"final loss {last['loss']:.4g}; use it with --weights {args.out}")


def cmd_convert(args) -> None:
    from dn2_jax.convert import convert_checkpoint

    convert_checkpoint(args.src, args.dst, args.backbone, overwrite=args.overwrite)
    print(f"wrote {args.dst}")


def _run(args) -> None:
    """Runs the command; embed, fit, score and eval first join a multi-process job if the process flags or a
    cluster's environment say so (`dn2_jax.distributed`), and then only process 0 prints and writes outputs."""
    from dn2_jax import distributed

    if args.func in (cmd_eval, cmd_embed, cmd_fit, cmd_score) and distributed.initialize(
            distributed.ProcessConfig(**given_settings(args, distributed.ProcessConfig))):
        if not distributed.is_writer():
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                args.func(args)
            return
    args.func(args)


def main(argv: list[str] | None = None) -> int:
    from dn2_jax.compile_cache import use_compilation_cache
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # before JAX starts its CPU backend; see dn2_jax/hostmem.py
    parser = build_parser()
    data_log = logging.getLogger("dn2_jax.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # the commands report skipped image files themselves (_report_skipped)
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "no_cache"):  # compiled programs reused across runs (dn2_jax/compile_cache.py)
            use_compilation_cache(getattr(args, "cache_dir", DEFAULT_CACHE))
        _run(args)
    except DN2Error as e:  # user mistakes: one line, no traceback
        print(f"dn2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dn2: interrupted", file=sys.stderr)
        return 130
    finally:
        data_log.setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
