"""JAX's persistent compilation cache under the dn2 cache folder: a later run loads its compiled programs.

Compiling the jitted forward pass of a backbone takes seconds on CPU (ResNet-50: ~1.5-4 s at batch 64, plus
the kNN and scoring programs), paid by every `dn2` process. With the cache on, a process that runs a program
compiled before (same shapes, dtypes, JAX/XLA version, flags and machine) reads the executable from disk.
Tracing (Python) still happens; only XLA's compilation is skipped.

The cache lives in ``<cache_dir>/xla/<host key>``: the host key hashes the JAX version, the CPU model and its
instruction-set flags, so a cache folder shared between machines (e.g. a network home) never hands one
machine code compiled for another CPU. Its size is capped (least recently used entries are dropped).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

#: Largest size of the compilation cache folder, bytes (least recently used entries are evicted beyond it).
MAX_CACHE_BYTES = 512 * 1024 * 1024


def host_key() -> str:
    """16 hex digits identifying what compiled code depends on here: JAX/jaxlib version, machine, CPU flags."""
    import jax
    import jaxlib

    parts = [jax.__version__, jaxlib.__version__, platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            parts += sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def use_compilation_cache(cache_dir: str | os.PathLike) -> Path:
    """Turns on JAX's persistent compilation cache in ``<cache_dir>/xla/<host_key()>``; returns that folder.

    Process-wide (a JAX config setting), and effective only if called before the process compiles its first
    program: JAX sets its cache up once, at the first compilation. Every program is cached, however fast it
    compiled (the small scoring programs add up to seconds too). The folder is created when JAX first writes.
    When the environment sets ``JAX_COMPILATION_CACHE_DIR``, that folder is used instead (and returned).
    """
    import jax

    folder = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path(cache_dir).absolute() / "xla" / host_key())
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return folder
