"""Flax ResNet architecture and torchvision key mapping (numerical equivalence: tests/test_convert.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from dn2_jax.errors import DN2Error
from dn2_jax.models import fingerprint, get_backbone, resnet

DEPTHS = (18, 34, 50, 101, 152)


def torchvision_meta_state_dict(depth: int) -> dict[str, torch.Tensor]:
    """torchvision's resnet{depth} state dict on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        model = getattr(torchvision.models, f"resnet{depth}")()
    return model.state_dict()


def zeros_state_dict(depth: int) -> dict[str, np.ndarray]:
    """A state dict with torchvision's keys and shapes for resnet{depth}, backed by one scalar (no memory)."""
    return {
        k: np.broadcast_to(np.float32(0), tuple(v.shape))
        for k, v in torchvision_meta_state_dict(depth).items()
    }


@pytest.mark.parametrize("depth", DEPTHS)
def test_keys_shapes_and_parameter_count_match_torchvision(depth):
    tv = torchvision_meta_state_dict(depth)
    expected = {k: tuple(v.shape) for k, v in tv.items() if not k.endswith("num_batches_tracked")}
    assert resnet.torch_layout(f"resnet{depth}").torch_shapes() == expected

    shapes = jax.eval_shape(
        resnet.RESNETS[depth]().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
    )
    flax_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    with torch.device("meta"):
        torch_params = sum(p.numel() for p in getattr(torchvision.models, f"resnet{depth}")().parameters())
    assert flax_params == torch_params
    assert set(shapes) == {"params", "batch_stats"}


@pytest.mark.parametrize("depth, width", [(18, 512), (50, 2048)])
def test_feature_dict_shapes(depth, width):
    model = resnet.RESNETS[depth]()
    x = jnp.zeros((2, 64, 64, 3), jnp.float32)
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0]
    expansion = width // 512
    assert out["stem"].shape == (2, 16, 16, 64)
    for i, size in enumerate((16, 8, 4, 2)):
        assert out[f"stage{i + 1}"].shape == (2, size, size, 64 * 2**i * expansion)
    assert out["pooled"].shape == (2, width)
    assert out["logits"].shape == (2, 1000)


def test_converted_leaves_are_transposed_torch_arrays():
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zeros_state_dict(18).items()}
    variables = get_backbone("resnet18").from_state_dict(sd)
    flat = traverse_util.flatten_dict(variables, sep="/")
    np.testing.assert_array_equal(flat["params/conv1/kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        flat["params/layer2_0/downsample_0/kernel"], sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(flat["params/fc/kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(flat["params/layer4_1/bn2/scale"], sd["layer4.1.bn2.weight"])
    np.testing.assert_array_equal(flat["batch_stats/layer3_0/bn1/var"], sd["layer3.0.bn1.running_var"])
    assert len(flat) == len([k for k in sd if not k.endswith("num_batches_tracked")])
    # The converted tree has exactly the structure the model creates.
    init_shapes = jax.eval_shape(resnet.ResNet18().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.structure(init_shapes) == jax.tree.structure(variables)
    assert jax.tree.map(lambda a: a.shape, init_shapes) == jax.tree.map(lambda a: a.shape, variables)


def test_other_depth_is_recognised():
    with pytest.raises(DN2Error, match=r"looks like a resnet18 checkpoint .*not resnet50: pick the backbone resnet18"):
        get_backbone("resnet50").from_state_dict(zeros_state_dict(18))
    with pytest.raises(DN2Error, match=r"looks like a resnet101 checkpoint .*not resnet152"):
        get_backbone("resnet152").from_state_dict(zeros_state_dict(101))


def test_missing_unexpected_and_wrong_shape():
    sd = zeros_state_dict(18)
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(DN2Error, match=r"1 missing keys \(e\.g\. layer3\.1\.bn2\.running_var\)"):
        get_backbone("resnet18").from_state_dict(missing)

    extra = {**sd, "head.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(DN2Error, match=r"1 unexpected keys \(e\.g\. head\.weight\)"):
        get_backbone("resnet18").from_state_dict(extra)

    wrong = {**sd, "fc.weight": np.zeros((10, 512), np.float32)}
    with pytest.raises(DN2Error, match=r"fc\.weight.*expected \(1000, 512\), got \(10, 512\)"):
        get_backbone("resnet18").from_state_dict(wrong)

    with pytest.raises(DN2Error, match=r"not a resnet50 state dict: \d+ missing keys"):
        get_backbone("resnet50").from_state_dict({"features.0.weight": np.zeros(3, np.float32)})


def test_bad_depth():
    with pytest.raises(DN2Error, match=r"unknown ResNet 'resnet20'; known: resnet18, resnet34, resnet50"):
        resnet.torch_layout("resnet20")


def _random_bn_variables(depth: int, seed: int = 0):
    """resnet{depth} variables with random kernels and random BatchNorm scale/bias/mean/var."""
    variables = get_backbone(f"resnet{depth}").from_state_dict(zeros_state_dict(depth))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables)
    for path, leaf in flat.items():
        shape = leaf.shape
        if path[-1] == "kernel":
            flat[path] = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
        elif path[-1] in ("scale", "var"):
            flat[path] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # bias, mean
            flat[path] = rng.normal(0, 0.2, shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_folded_batchnorm_gives_the_same_features(depth):
    """Measured (2026-11-29, CPU): max |Δ| / max |feature| ≤ 1.4e-6 (ResNet-18) and 2.1e-6 (ResNet-50) over
    stem, stage2, pooled and logits; the bound is 1e-5."""
    variables = _random_bn_variables(depth)
    print_before = fingerprint(variables)
    folded = resnet.fold_batchnorm(variables)
    assert fingerprint(variables) == print_before  # pure: the user's variables (and fingerprint) are unchanged
    assert set(folded) == {"params"}
    flat = traverse_util.flatten_dict(folded["params"], sep="/")
    assert not any("bn" in k or "downsample_1" in k for k in flat)
    assert flat["layer1_0/conv1/bias"].shape == (64,)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
    ref = jax.jit(resnet.RESNETS[depth]().apply)(variables, x)
    out = jax.jit(resnet.RESNETS[depth](folded=True).apply)(folded, x)
    for key in ("stem", "stage2", "pooled", "logits"):
        scale = float(jnp.max(jnp.abs(ref[key])))
        # float32 rounding: the folded kernels round once more; relative to the feature scale, 1e-5 at most.
        np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=1e-5 * scale, err_msg=key)


def test_embedding_uses_folded_resnet_and_training_keeps_batchnorm():
    spec = get_backbone("resnet18")
    module, variables = spec.for_inference(_random_bn_variables(18))
    assert module().folded and "batch_stats" not in variables
    assert not spec.module().folded and not spec.module(train=True).folded
    with pytest.raises(DN2Error, match="folded ResNet has no BatchNorm to train"):
        resnet.ResNet18(folded=True, train=True).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(DN2Error, match="fold_batchnorm needs ResNet variables"):
        resnet.fold_batchnorm({"params": {}})
    # EfficientNet-Lite has no inference rewrite: the spec's module and the variables as given.
    lite = get_backbone("efficientnet_lite0")
    marker = object()
    assert lite.for_inference(marker) == (lite.module, marker)
