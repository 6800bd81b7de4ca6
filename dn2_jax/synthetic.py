"""A seeded synthetic-defect data set in the MVTec AD layout, with exact masks.

Every image is a generated woven texture (two crossed sinusoidal gratings of random period, orientation and
phase, over smooth low-frequency shading and fine noise, in a random warm/cool tint). Defects are drawn onto
test images with their exact masks:

  scratch  a thin straight or slightly bent stroke, 2-5 px wide, 25-45% of the side long, darker or lighter;
  blob     an irregular stain (a noisy ellipse, radius 5-12% of the side) with shifted colour.

Layout written by :func:`write_synthetic_mvtec` (``<out>`` is one "category")::

  <out>/train/good/000.png ...            <out>/test/good/000.png ...
  <out>/test/<defect>/000.png ...         <out>/ground_truth/<defect>/000_mask.png   (0 / 255)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dn2_jax.errors import DN2Error

DEFECTS = ("scratch", "blob")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 woven texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.045, 0.06)
    theta = rng.uniform(-0.15, 0.15)
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    weave = (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
             * np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)))
    shade = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 8) * size / 8 * 0.15
    noise = rng.standard_normal((size, size)) * 0.08
    lum = 0.55 + 0.16 * weave + shade + noise
    tint = np.array([0.85, 0.75, 0.6]) + rng.uniform(-0.04, 0.04, 3)
    return np.clip(lum[..., None] * tint * 255, 0, 255).astype(np.uint8)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    length = rng.uniform(0.25, 0.45) * size
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    bend = rng.uniform(-0.15, 0.15) * length
    width = rng.uniform(2.0, 5.0)
    t = np.linspace(-0.5, 0.5, 200)
    px = cx + t * length * np.cos(angle) - (1 - 4 * t**2) * bend * np.sin(angle)
    py = cy + t * length * np.sin(angle) + (1 - 4 * t**2) * bend * np.cos(angle)
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for x0, y0 in zip(px, py, strict=True):
        r = int(np.ceil(width / 2)) + 1
        ys, xs = slice(max(0, int(y0) - r), int(y0) + r + 1), slice(max(0, int(x0) - r), int(x0) + r + 1)
        mask[ys, xs] |= (yy[ys, xs] - y0) ** 2 + (xx[ys, xs] - x0) ** 2 <= (width / 2) ** 2
    return mask


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    rx, ry = rng.uniform(0.05, 0.12, 2) * size
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)) / rx
    v = (-np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)) / ry
    wobble = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 40) * size / 40 * 0.6
    return u**2 + v**2 + wobble <= 1.0


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with a ``kind`` defect drawn on it, its exact bool mask (H, W)); image uint8 (H, W, 3)."""
    size = image.shape[0]
    if kind == "scratch":
        mask = _scratch(rng, size)
        colour = np.array([40.0, 35.0, 30.0]) if rng.random() < 0.5 else np.array([245.0, 240.0, 230.0])
        alpha = 0.85
    elif kind == "blob":
        mask = _blob(rng, size)
        colour = image[mask].mean(axis=0) * rng.uniform(0.55, 0.75) + np.array([30.0, 5.0, -10.0])
        alpha = 0.75
    else:
        raise DN2Error(f"unknown defect {kind!r}; known: {', '.join(DEFECTS)}")
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8), mask


def make_synthetic(n_train: int = 64, n_test_good: int = 40, n_test_defect: int = 30, size: int = 224,
                   seed: int = 0, defects: tuple[str, ...] = DEFECTS) -> dict:
    """The data set in memory: {'train': uint8 (n_train, S, S, 3), 'test': uint8 (T, S, S, 3), 'masks': bool
    (T, S, S), 'defect': list of T names ('good' or a defect), 'label': int (T,)}; ``n_test_defect`` per defect.
    Train and test textures are independent draws of the same generator."""
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if value < 0:
            raise DN2Error(f"{name} must be >= 0, got {value}")
    if size < 16:
        raise DN2Error(f"size must be at least 16 px, got {size}")
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown:
        raise DN2Error(f"unknown defect(s) {', '.join(unknown)}; known: {', '.join(DEFECTS)}")
    rng = np.random.default_rng(seed)
    train = np.stack([texture(rng, size) for _ in range(n_train)]) if n_train else np.zeros((0, size, size, 3),
                                                                                             np.uint8)
    test, masks, names = [], [], []
    for _ in range(n_test_good):
        test.append(texture(rng, size))
        masks.append(np.zeros((size, size), bool))
        names.append("good")
    for kind in defects:
        for _ in range(n_test_defect):
            image, mask = draw_defect(texture(rng, size), kind, rng)
            test.append(image)
            masks.append(mask)
            names.append(kind)
    return {"train": train, "test": np.stack(test), "masks": np.stack(masks), "defect": names,
            "label": np.array([n != "good" for n in names], np.int64)}


def write_synthetic_mvtec(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Writes :func:`make_synthetic` (same keyword arguments) to ``out_dir`` in the MVTec AD layout (see the module
    docstring) and returns the path. ``out_dir`` must not exist or be empty (checked before writing)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DN2Error(f"out_dir {out} exists and is not an empty directory")
    data = make_synthetic(**kwargs)
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data["train"]):
        Image.fromarray(image).save(out / "train" / "good" / f"{i:03d}.png")
    counters: dict[str, int] = {}
    for image, mask, name in zip(data["test"], data["masks"], data["defect"], strict=True):
        i = counters[name] = counters.get(name, -1) + 1
        (out / "test" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / "test" / name / f"{i:03d}.png")
        if name != "good":
            (out / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / name / f"{i:03d}_mask.png")
    return out
