"""Streaming input (dn2_jax.pipeline): peak RSS of `dn2 embed` from image folders of growing size, and
end-to-end throughput against the backbone's own rate on the same batch shape.

  rss         A folder of --sizes[-1] small PNG files (16x16 RGB, pixel values from the image number; 200 classes
              of up to 1,000 files) is written once under --root; each size N embeds the first N files (whole
              class folders, linked into a folder of their own) with `embed_split` (what `dn2 embed` runs) and
              the 'pixels' backbone (the flattened image as the feature: no network, so the input pipeline,
              the store writes and the listing are what is measured), in its own subprocess: peak RSS (VmHWM)
              per N. Decoded into memory, as before streaming, the images alone would take N x 768 bytes
              (+ ~100 bytes of array header each).
  throughput  --images JPEG files of 256x256 (smooth gradients + noise, quality 90) embedded with the default
              backbone (EfficientNet-Lite0 at its preset, batch 64, float32), in one process, alternating:
                backbone  the jitted embedding function alone over the same images already decoded in memory
                          (uint8 (64, 256, 256, 3) batches): the backbone's own rate on that batch shape;
                stream    FeatureExtractor.to_store from the folder (listing + header read + Grain reader
                          threads decoding ahead + the store's chunk writes): what `dn2 embed` / `dn2 eval` do.
              ratio = stream images/s / backbone images/s of the adjacent backbone run.

Usage: nice -n 10 python benchmarks/streaming.py [--sizes 20000,50000,100000,200000] [--images 2048]
       [--only rss|throughput] [--root /tmp/dn2-streaming]; writes benchmarks/results/streaming.json.
The 1-minute load average is recorded with every measurement: on a shared machine the ratios are what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import MB, peak_rss_bytes, rss_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PER_CLASS = 1000


def load() -> float:
    return round(os.getloadavg()[0], 2)


def write_pngs(root: Path, n: int) -> None:
    """root/all/c{k:03d}/{i:04d}.png: n 16x16 RGB images, PER_CLASS per class folder (existing files kept). The
    251 distinct images are encoded once and their bytes written (writing is then file-system bound)."""
    import io

    from PIL import Image

    base = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8)
    encoded = []
    for v in range(251):
        buf = io.BytesIO()
        Image.fromarray(np.stack([base + np.uint8(v), base, base], -1)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for j in range(n):
        folder = root / "all" / f"c{j // PER_CLASS:03d}"
        path = folder / f"{j % PER_CLASS:04d}.png"
        if j % PER_CLASS == 0:
            folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # written whole, then renamed: a killed run leaves no truncated file
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(encoded[j % 251])
            tmp.rename(path)


def size_folder(root: Path, n: int) -> Path:
    """root/n{n}/ holding links to the first n // PER_CLASS class folders."""
    out = root / f"n{n}"
    if not out.exists():
        out.mkdir()
        for k in range(n // PER_CLASS):
            (out / f"c{k:03d}").symlink_to(root / "all" / f"c{k:03d}")
    return out


def embed_folder(folder: str, store: Path):
    """What each size runs: `embed_split` (as `dn2 embed`) of the folder with the pixels backbone into `store`."""
    from dn2_jax.detector import DetectorConfig
    from dn2_jax.evaluation.features import embed_split

    return embed_split(store, DetectorConfig(backbone="pixels", batch_size=256), f"folder:{folder}", "all")


def rss_child(folder: str, n: int) -> dict:
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # as the dn2 command does
    base = rss_bytes()
    with tempfile.TemporaryDirectory(prefix="dn2-stream-store-") as tmp:
        t = time.perf_counter()
        st = embed_folder(folder, Path(tmp) / "store")
        seconds = time.perf_counter() - t
        assert st.count == n, (st.count, n)
        dim = st.dim
    return {"n": n, "dim": dim, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 1),
            "baseline_rss_mb": round(base / MB, 1), "peak_rss_mb": round(peak_rss_bytes() / MB, 1),
            "decoded_images_mb": round(n * 768 / MB, 1), "load_1min": load()}


def run_rss(root: Path, sizes: list[int], progress=None) -> list[dict]:
    t = time.perf_counter()
    write_pngs(root, max(sizes))
    print(f"wrote {max(sizes)} PNG files in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for n in sizes:
        folder = size_folder(root, n)
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(n)], capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(f"size {n} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
        if progress is not None:
            progress(rows)
    return rows


def write_jpegs(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "c").mkdir(parents=True, exist_ok=True)
    grad = np.add.outer(np.arange(256), np.arange(256)) / 2
    for i in range(n):
        path = folder / "c" / f"{i:05d}.jpg"
        if not path.exists():
            img = grad[..., None] + rng.normal(0, 20, (256, 256, 3)) + rng.integers(0, 128, 3)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def run_throughput(root: Path, n: int, repeats: int = 2) -> dict:
    from dn2_jax import data
    from dn2_jax.detector import Detector
    from dn2_jax.evaluation.features import FeatureExtractor
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()
    folder = root / f"jpeg{n}"
    write_jpegs(folder, n)
    det = Detector()  # the defaults: efficientnet_lite0, its preset, batch 64, float32
    extract = FeatureExtractor(det)
    bs = det.config.batch_size
    ds = data.load_dataset(f"folder:{folder}", "all")
    decoded = np.asarray(ds.images)  # (n, 256, 256, 3) for the backbone-only runs
    fn = det._pipe().embed_fn
    np.asarray(fn(decoded[:bs]))  # compile
    runs = []
    for r in range(repeats):
        t = time.perf_counter()
        for s in range(0, n, bs):
            np.asarray(fn(decoded[s : s + bs]))
        backbone = n / (time.perf_counter() - t)
        load_b = load()
        data.clear_cache()
        with tempfile.TemporaryDirectory(prefix="dn2-stream-tp-") as tmp:
            t = time.perf_counter()
            ds = data.load_dataset(f"folder:{folder}", "all")
            extract.to_store(Path(tmp) / "s", ds, np.arange(n))
            stream = n / (time.perf_counter() - t)
        runs.append({"repeat": r, "backbone_images_per_s": round(backbone, 2), "stream_images_per_s": round(stream, 2),
                     "ratio": round(stream / backbone, 3), "load_1min": [load_b, load()]})
        print(runs[-1], flush=True)
    ratios = [x["ratio"] for x in runs]
    return {"images": n, "image_size": [256, 256, 3], "format": "JPEG q90", "backbone": det.config.backbone,
            "batch_size": bs, "runs": runs, "ratio_mean": round(float(np.mean(ratios)), 3)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(rss_child(sys.argv[2], int(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,50000,100000,200000")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--only", choices=("rss", "throughput"))
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "dn2-streaming"))
    p.add_argument("--keep", action="store_true", help="keep the generated files under --root")
    p.add_argument("--out", default=str(RESULTS / "streaming.json"))
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % PER_CLASS for s in sizes):
        p.error(f"--sizes must be multiples of {PER_CLASS}")
    out = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_1min_start": load()}
    try:
        if args.only != "throughput":
            def progress(rows):  # each size's result is written as soon as it is measured
                peaks = [r["peak_rss_mb"] for r in rows]
                out["rss"] = {"backbone": "pixels", "image": [16, 16, 3], "rows": rows,
                              "peak_spread": round((max(peaks) - min(peaks)) / min(peaks), 3)}
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(out, indent=1))

            run_rss(root, sizes, progress)
        if args.only != "rss":
            out["throughput"] = run_throughput(root, args.images)
    finally:
        out["load_1min_end"] = load()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
