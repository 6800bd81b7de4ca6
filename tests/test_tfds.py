"""Real TFDS datasets: prepared offline with TensorFlow (python -m dn2_jax.tfds_prepare, in a subprocess), read by
the runtime with tfds.data_source without TensorFlow, lazily, and evaluated like the IDX files they came from."""

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from dn2_jax import data
from dn2_jax.cli import main
from dn2_jax.errors import DN2Error, DN2FileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "dn2_test_idx"
SHARD = f"{NAME}/1.0.0/{NAME}-test.array_record-00000-of-00001"


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")


def _write_idx(folder, prefix, images, labels):
    for kind, a in (("images-idx3", images), ("labels-idx1", labels)):
        raw = struct.pack(">I", 0x800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
        (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw))


def _toy_images(rng, labels):
    """28x28 noise; class 1 adds a faint square at a random place, so pixel-kNN separates the classes imperfectly."""
    images = rng.normal(90, 35, (len(labels), 28, 28))
    for image, label in zip(images, labels, strict=True):
        if label:
            r, c = rng.integers(0, 18, 2)
            image[r:r + 10, c:c + 10] += 30
    return images.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(IDX folder, TFDS data_dir) of one small 2-class dataset, prepared once per session with TensorFlow."""
    root = tmp_path_factory.mktemp("tfds")
    idx, tfds_dir = root / "idx", root / "tfds"
    idx.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 48)):
        labels = rng.permutation(np.arange(n) % 2).astype(np.uint8)
        _write_idx(idx, prefix, _toy_images(rng, labels), labels)
    proc = subprocess.run([sys.executable, "-m", "dn2_jax.tfds_prepare", f"idx:{idx}", "--name", NAME,
                           "--class-names", "T-shirt/top,Trouser", "--data-dir", str(tfds_dir)],
                          env=_env(), capture_output=True, text=True, timeout=1800)  # 600 s ran out at load 25
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tfds_dir / NAME / "1.0.0")  # after tfds's own messages
    return idx, tfds_dir


def _damaged_copy(prepared, tmp_path, damage):
    shutil.copytree(prepared[1], tmp_path / "tfds")
    damage(tmp_path / "tfds" / SHARD)
    data.clear_cache()
    return str(tmp_path / "tfds")


@pytest.mark.slow
def test_reads_the_idx_images_lazily_and_without_tensorflow(prepared):
    idx, tfds_dir = prepared
    script = f"""
import sys
import numpy as np
import tensorflow_datasets as tfds
from dn2_jax import data
decoded = []
decode = tfds.features.Image.decode_example_np
tfds.features.Image.decode_example_np = lambda self, *a, **k: decoded.append(1) or decode(self, *a, **k)
for split in ("train", "test"):
    ds, ref = data.load_tfds("{NAME}", split, "{tfds_dir}"), data.load_idx("{idx}", split)
    # Loading reads each record once for its label (tfds 4.9's data_source decodes the image with it, keeping
    # none); images are then decoded only when they are read.
    assert isinstance(ds.images, data.TfdsImages) and len(decoded) <= len(ref.labels), len(decoded)
    decoded.clear()
    assert ds.images.shape == ref.images.shape and ds.class_names == ["T-shirt/top", "Trouser"]
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert not decoded
    np.testing.assert_array_equal(ds.images[5], ref.images[5])
    assert len(decoded) == 1
    np.testing.assert_array_equal(ds.images[:], ref.images)
print("tensorflow" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"  # the runtime never imported TensorFlow


@pytest.mark.slow
def test_images_index_like_an_array_and_pickle(prepared):
    idx, tfds_dir = prepared
    data.clear_cache()
    ds, ref = data.load_tfds(NAME, "test", str(tfds_dir)), data.load_idx(str(idx), "test")
    images = ds.images
    assert len(images) == 48 and images.dtype == np.uint8 and images.ndim == 3
    np.testing.assert_array_equal(images[-1], ref.images[-1])
    np.testing.assert_array_equal(images[[7, 2, 7]], ref.images[[7, 2, 7]])
    np.testing.assert_array_equal(images[10:20:3], ref.images[10:20:3])
    np.testing.assert_array_equal(images[ref.labels == 1], ref.images[ref.labels == 1])
    assert images[np.arange(0)].shape == (0, 28, 28)
    np.testing.assert_array_equal(np.asarray(images), ref.images)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(images))[3], ref.images[3])  # for worker processes
    with pytest.raises(IndexError):
        images[48]
    assert not ds.labels.flags.writeable
    # a split expression reads only its part
    part = data.load_tfds(NAME, "test[10:20]", str(tfds_dir))
    np.testing.assert_array_equal(part.images[:], ref.images[10:20])


@pytest.mark.slow
@pytest.mark.parametrize("quick", [[], ["--bank-size", "12", "--test-size", "30"]])
def test_eval_on_tfds_equals_eval_on_the_idx_files(prepared, tmp_path, capsys, quick):
    """The same images through both readers give the same ROC-AUC, also on a subsample (same record order)."""
    idx, tfds_dir = prepared
    results = []
    for spec, where in (("fashion_mnist", idx), (f"tfds:{NAME}", tfds_dir)):
        out = tmp_path / spec.replace(":", "_")
        code = main(["eval", "--dataset", spec, "--data-dir", str(where), "--classes", "0,1", "--backbone", "pixels",
                     "--k", "2", "--no-cache", *quick, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        results.append(json.loads((out / "results.json").read_text()))
    idx_run, tfds_run = results
    assert tfds_run["dataset"] == f"tfds:{NAME}"
    assert list(tfds_run["per_class"]) == list(idx_run["per_class"]) == ["T-shirt/top", "Trouser"]
    assert all(0.1 < auc < 0.95 for auc in idx_run["per_class"].values())  # not perfect: equal AUCs say something
    for c, auc in idx_run["per_class"].items():
        assert tfds_run["per_class"][c] == pytest.approx(auc, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("damage, match", [
    (os.remove, r"missing file .*dn2_test_idx-test\.array_record-00000-of-00001"),
    (lambda f: f.write_bytes(f.read_bytes()[:4000]), r"labels of .*dn2_test_idx-test\.array_record.*damaged or trunc"),
    (lambda f: f.write_bytes(f.read_bytes()[:300] + bytes(16) + f.read_bytes()[316:]),
     r"labels of .*dn2_test_idx-test\.array_record.*damaged or truncated.*Corrupted"),
])
def test_a_missing_or_damaged_array_record_file_is_named(prepared, tmp_path, damage, match):
    tfds_dir = _damaged_copy(prepared, tmp_path, damage)
    with pytest.raises(DN2FileError, match=match):
        data.load_tfds(NAME, "test", tfds_dir)
    assert len(data.load_tfds(NAME, "train", tfds_dir)) == 40  # the other split's file is intact


@pytest.mark.slow
def test_not_prepared_names_the_command(prepared, tmp_path, capsys):
    empty = tmp_path / "empty"
    code = main(["eval", "--dataset", f"tfds:{NAME}", "--data-dir", str(empty), "--backbone", "pixels",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and f"no dataset named '{NAME}'" in err
    assert f"python -m dn2_jax.tfds_prepare idx:PATH --name {NAME} --data-dir {empty}" in err
    assert not (tmp_path / "r").exists()
    # fashion_mnist's files are local (Debian's dataset-fashion-mnist): it is prepared offline, not downloaded
    code = main(["eval", "--dataset", "tfds:fashion_mnist", "--data-dir", str(empty), "--backbone", "pixels",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "'fashion_mnist' is not prepared" in err
    assert f"python -m dn2_jax.tfds_prepare fashion_mnist --data-dir {empty}" in err


def test_prepare_command_for_each_kind_of_dataset():
    offline = data.tfds_prepare_command("fashion_mnist", "D")  # Debian's dataset-fashion-mnist is installed
    assert offline == "python -m dn2_jax.tfds_prepare fashion_mnist --data-dir D"
    assert "tfds.builder('cifar10', data_dir='D', file_format='array_record').download_and_prepare()" in \
        data.tfds_prepare_command("cifar10", "D")
    assert data.tfds_prepare_command("my_scans", "D") == \
        "python -m dn2_jax.tfds_prepare idx:PATH --name my_scans --data-dir D"


def test_prepare_refuses_bad_arguments_before_writing(tmp_path):
    from dn2_jax.tfds_prepare import prepare

    out = tmp_path / "out"
    idx = tmp_path / "idx"
    idx.mkdir()
    labels = np.array([0, 1, 2], np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(idx, prefix, np.zeros((3, 28, 28), np.uint8), labels)
    for kwargs, match in [
        (dict(source=f"idx:{idx}"), "give the dataset a name"),
        (dict(source=f"idx:{idx}", name="My-Set"), "lower-case"),
        (dict(source=f"idx:{idx}", name="cifar10"), "a dataset of tfds itself"),
        (dict(source=f"idx:{idx}", name="ok", class_names=["a", "b"]), "2 names but .* labels up to 2"),
        (dict(source=f"idx:{idx}", name="ok", class_names=["a", "a", "b"]), "must differ"),
        (dict(source="imagenet"), "cannot prepare 'imagenet'"),
        (dict(source="mnist", name="digits"), "tfds's own name 'mnist'"),
        (dict(source=f"idx:{tmp_path / 'nowhere'}", name="ok"), "does not exist"),
    ]:
        with pytest.raises(DN2Error, match=match):
            prepare(data_dir=str(out), **kwargs)
    assert not out.exists()
