import jax
import numpy as np
import pytest
import torch
from skimage import data as skdata
from torchvision.transforms import v2 as T

from dn2_jax.errors import DN2Error
from dn2_jax.preprocessing import PRESETS, Preset, get_preset, preprocess


def _torchvision(images: np.ndarray, preset: Preset) -> np.ndarray:
    """Reference: torchvision Resize (antialiased bilinear, float) → CenterCrop → Normalize, NHWC out."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = T.Resize(preset.resize, antialias=True)(x)
    x = T.CenterCrop(preset.crop)(x)
    x = T.Normalize(preset.mean, preset.std)(x)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", ["imagenet", "efficientnet_lite0"])
@pytest.mark.parametrize("size", [48, 112])
def test_matches_torchvision(name, size):
    image = skdata.chelsea()[::4, ::4]  # (75, 113, 3): downsampling to 55, upsampling to 128
    preset = get_preset(name).at_size(size)
    ours = np.asarray(preprocess(image[None], preset))
    ref = _torchvision(image[None], preset)
    assert ours.shape == ref.shape == (1, size, size, 3)
    # Same filter and sampling grid: agreement to float32 rounding, in grey levels.
    assert np.abs(ours - ref).max() * max(preset.std) < 1e-2


def test_centre_crop_matches_torchvision_exactly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 9, 14, 3), dtype=np.uint8)  # odd margins: rounding matters
    preset = Preset(resize=9, crop=6, mean=(0.0,) * 3, std=(1.0,) * 3)
    np.testing.assert_array_equal(np.asarray(preprocess(images, preset)), _torchvision(images, preset))


def test_grayscale_is_replicated():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    preset = PRESETS["imagenet"].at_size(32)
    expected = np.asarray(preprocess(rgb, preset))
    np.testing.assert_array_equal(np.asarray(preprocess(gray, preset)), expected)
    np.testing.assert_array_equal(np.asarray(preprocess(gray[..., None], preset)), expected)


def test_jit_equals_eager_and_normalisation():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    preset = PRESETS["efficientnet_lite0"].at_size(16)
    out = jax.jit(preprocess, static_argnums=1)(images, preset)
    assert out.dtype == np.float32 and out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(preprocess(images, preset)), atol=1e-6)
    # A constant image stays constant: (v - 127) / 128.
    const = np.full((1, 20, 30, 3), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(preprocess(const, preset)), (255 - 127) / 128, rtol=1e-6)


def test_presets():
    assert (PRESETS["imagenet"].resize, PRESETS["imagenet"].crop) == (256, 224)
    lite = [PRESETS[f"efficientnet_lite{i}"] for i in range(3)]
    assert [(p.resize, p.crop) for p in lite] == [(256, 224), (274, 240), (297, 260)]
    assert all(p.mean == (127,) * 3 and p.std == (128,) * 3 for p in lite)
    small = PRESETS["imagenet"].at_size(112)
    assert (small.resize, small.crop, small.mean) == (128, 112, PRESETS["imagenet"].mean)
    with pytest.raises(DN2Error, match="unknown preprocessing preset 'vgg'"):
        get_preset("vgg")
    with pytest.raises(DN2Error, match="crop"):
        Preset(resize=10, crop=20, mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(DN2Error, match="input_size"):
        PRESETS["imagenet"].at_size(0)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8), np.uint8), "shape"),
        (np.zeros((2, 8, 8, 2), np.uint8), "C = 1 or 3"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros((2, 0, 8, 3), np.uint8), "pixel"),
        (np.zeros((0, 8, 8, 3), np.uint8), "images is empty"),
        (np.zeros((0, 8, 8), np.uint8), "images is empty"),
        (np.zeros((32, 32, 3), np.uint8), r"looks like a single image.*images\[None\]"),
        (np.zeros((32, 32, 4), np.uint8), "looks like a single image"),
        (np.zeros((32, 32, 1), np.uint8), r"\(N, H, W, 1\)"),
    ],
)
def test_bad_input(images, match):
    with pytest.raises(DN2Error, match=match):
        preprocess(images, PRESETS["imagenet"])
