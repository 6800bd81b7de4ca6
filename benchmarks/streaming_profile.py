"""Where the streaming benchmark's memory goes, by Python allocation site (tracemalloc): for each size N, the
memory the listed dataset holds and the traced peak while `embed_split` streams it into a store (the same
generated PNG folders and pixels backbone as `benchmarks/streaming.py --only rss`). tracemalloc slows the run
several-fold and sees only Python/NumPy allocations, so this explains the RSS figures, it does not replace them.

    .venv/bin/python benchmarks/streaming_profile.py --sizes 20000,100000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import streaming  # noqa: E402

MB = 2**20


def child(folder: str) -> None:
    from dn2_jax import data
    from dn2_jax.hostmem import keep_freed_memory

    keep_freed_memory()
    tracemalloc.start(1)
    ds = data.load_dataset(f"folder:{folder}", "all")
    held = tracemalloc.get_traced_memory()[0]
    top = tracemalloc.take_snapshot().statistics("lineno")[:5]
    tracemalloc.reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        streaming.embed_folder(folder, Path(tmp) / "store")
        peak = tracemalloc.get_traced_memory()[1]
    print(f"N={len(ds)}: listed dataset holds {held / MB:.1f} MB traced; peak while embedding {peak / MB:.1f} MB")
    for st in top:
        print("   ", st)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,100000")
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "dn2-streaming-profile"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        streaming.write_pngs(root, max(sizes))
        for n in sizes:
            subprocess.run([sys.executable, __file__, "--child", str(streaming.size_folder(root, n))], check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
