"""Torchvision checkpoints -> Flax ResNets through files, torch_io and Orbax; equivalence with torchvision."""

import hashlib
import re

import jax
import numpy as np
import pytest
import torch
import torchvision

from dn2_jax import convert, models
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.models import resnet


def random_torchvision_resnet(depth: int, seed: int = 0) -> torch.nn.Module:
    """torchvision resnet{depth} in eval mode with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def torch_outputs(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision (pooled features, logits) for NHWC float images."""
    pooled = {}
    hook = model.avgpool.register_forward_hook(lambda _m, _i, out: pooled.setdefault("x", out.flatten(1)))
    with torch.inference_mode():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    hook.remove()
    return pooled["x"].numpy(), logits.numpy()


def assert_close_to_scale(actual, expected, rtol=1e-4):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= rtol * np.max(np.abs(expected))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    """A legacy-format (pre-1.6 pickle stream) torch.save of a random resnet18, and the model."""
    model = random_torchvision_resnet(18)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-random.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    return path, model


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
    """A zip-format torch.save of a random resnet50 wrapped as {'state_dict': ...}, and the model."""
    model = random_torchvision_resnet(50, seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50-random.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


def test_resnet18_legacy_pth_matches_torchvision(resnet18_pth, images):
    path, model = resnet18_pth
    variables = convert.load_variables("resnet18", path)
    out = resnet.ResNet18().apply(variables, images)
    pooled, logits = torch_outputs(model, images)
    assert_close_to_scale(out["pooled"], pooled)
    assert_close_to_scale(out["logits"], logits)


def test_safetensors_gives_the_same_variables(resnet18_pth, tmp_path):
    from safetensors.torch import save_file

    path, model = resnet18_pth
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    from_safetensors = convert.load_variables("resnet18", tmp_path / "resnet18.safetensors")
    assert models.fingerprint(from_safetensors) == models.fingerprint(convert.load_variables("resnet18", path))


def test_resnet50_zip_pth_through_orbax_matches_torchvision(resnet50_pth, images, tmp_path):
    src, model = resnet50_pth
    dst = convert.convert_checkpoint(src, tmp_path / "resnet50", "resnet50")
    variables, metadata = convert.restore_variables(dst)
    assert metadata["backbone"] == "resnet50"
    assert metadata["source"] == src.name
    assert metadata["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert metadata["fingerprint"] == models.fingerprint(variables)

    out = jax.jit(resnet.ResNet50().apply)(convert.load_variables("resnet50", dst), images)
    pooled, logits = torch_outputs(model, images)
    assert_close_to_scale(out["pooled"], pooled)
    assert_close_to_scale(out["logits"], logits)


def test_wrong_backbone_for_a_checkpoint(resnet18_pth, tmp_path):
    src, _ = resnet18_pth
    with pytest.raises(DN2Error, match="looks like a resnet18 checkpoint.*not resnet50"):
        convert.convert_checkpoint(src, tmp_path / "out", "resnet50")
    assert not (tmp_path / "out").exists()
    dst = convert.convert_checkpoint(src, tmp_path / "r18", "resnet18")
    with pytest.raises(DN2Error, match=r"'resnet18'.*not 'resnet34'"):
        convert.load_variables("resnet34", dst)


def test_orbax_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "params": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
                   "fc": {"bias": rng.standard_normal(5).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": rng.standard_normal(4).astype(np.float32)}},
    }
    metadata = {"backbone": "resnet18", "note": "x", "n": 3}
    convert.save_variables(variables, tmp_path / "ck", metadata)
    restored, restored_meta = convert.restore_variables(tmp_path / "ck")
    assert restored_meta == metadata
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path):
    one = {"params": {"w": np.ones(3, np.float32)}}
    two = {"params": {"w": np.full(3, 2.0, np.float32)}}
    convert.save_variables(one, tmp_path / "ck", {"backbone": "a"})
    with pytest.raises(DN2Error, match="already exists.*overwrite=True"):
        convert.save_variables(two, tmp_path / "ck", {"backbone": "b"})
    kept, _ = convert.restore_variables(tmp_path / "ck")
    np.testing.assert_array_equal(kept["params"]["w"], one["params"]["w"])

    convert.save_variables(two, tmp_path / "ck", {"backbone": "b"}, overwrite=True)
    restored, meta = convert.restore_variables(tmp_path / "ck")
    np.testing.assert_array_equal(restored["params"]["w"], two["params"]["w"])
    assert meta == {"backbone": "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging or temporary leftovers


def test_convert_refuses_existing_destination_before_reading(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(DN2Error, match="dst.*already exists"):
        convert.convert_checkpoint(tmp_path / "missing.pth", tmp_path / "dst", "resnet18")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]


def test_bad_metadata_writes_nothing(tmp_path):
    with pytest.raises(DN2Error, match="metadata"):
        convert.save_variables({"params": {"w": np.ones(2, np.float32)}}, tmp_path / "ck", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_missing_and_unusable_weights(tmp_path):
    with pytest.raises(DN2FileError, match="nope.pth"):
        convert.load_variables("resnet18", tmp_path / "nope.pth")
    (tmp_path / "weights.txt").write_text("hi")
    with pytest.raises(DN2Error, match="weights.txt"):
        convert.load_variables("resnet18", tmp_path / "weights.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DN2FileError, match="not a dn2 Orbax checkpoint"):
        convert.load_variables("resnet18", tmp_path / "empty")
    with pytest.raises(DN2Error, match="torchvision"):
        convert.load_variables("resnet18")


def test_fingerprint_mismatch_is_refused(tmp_path):
    variables = models.init_random_variables("resnet18")
    convert.save_variables(variables, tmp_path / "ck", {"backbone": "resnet18", "fingerprint": "0" * 64})
    with pytest.raises(DN2FileError, match="corrupt"):
        convert.load_variables("resnet18", tmp_path / "ck")


def test_default_weights_of_efficientnet_lite0():
    variables = convert.load_variables("efficientnet_lite0")
    expected = models.init_random_variables("efficientnet_lite0")
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, expected)
    assert models.fingerprint(variables) != models.fingerprint(expected)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_one_conversion_for_both_families(name):
    """Both families go through `from_torch.from_torch_state_dict`: same transforms, same messages."""
    from dn2_jax.models import efficientnet, from_torch

    family = resnet if name.startswith("resnet") else efficientnet
    layout = family.torch_layout(name)
    rng = np.random.default_rng(0)
    sd = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in layout.torch_shapes().items()}
    sd[next(iter(sd)).rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(3)  # ignored
    variables = models.get_backbone(name).from_state_dict(sd)
    flat = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert len(flat) == len(layout.keys)
    for path, (key, _) in layout.keys.items():
        leaf = variables
        for part in path:
            leaf = leaf[part]
        np.testing.assert_array_equal(leaf, from_torch.to_flax(sd[key]))
        assert leaf.dtype == np.float32
    first_key, first_shape = next(iter(layout.keys.values()))
    cases = [
        ({k: v for k, v in sd.items() if k != first_key}, rf"not a {name} state dict: 1 missing keys \(e\.g\. "
                                                          rf"{re.escape(first_key)}\)$"),
        ({**sd, "extra.weight": np.zeros(2)}, rf"not a {name} state dict: 1 unexpected keys \(e\.g\. extra\.weight\)$"),
        ({**sd, first_key: np.zeros((1, *first_shape))}, rf"wrong shape for {re.escape(first_key)} in the {name} "
                                                         rf"state dict: expected {re.escape(str(first_shape))}, got"),
    ]
    for bad, message in cases:
        with pytest.raises(DN2Error, match=message):
            models.get_backbone(name).from_state_dict(bad)
