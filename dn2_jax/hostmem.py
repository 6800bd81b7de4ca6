"""Host allocator settings for XLA:CPU: keep freed memory for reuse instead of handing it back to the kernel.

XLA:CPU (and the YNNPACK kernels it calls) allocate every execution's scratch afresh: about 1 GB per batch of
64 images at 224² with EfficientNet-Lite0, in blocks of 38-620 MB. glibc serves blocks above 32 MB (and any
block too big for a worker thread's arena) with `mmap` and unmaps them when they are freed, so each batch
page-faults its whole scratch in again: ~4,500 minor faults per image, about a third of the CPU time spent in
the kernel. `keep_freed_memory` makes glibc serve such blocks from one heap it does not trim, so after the
first batch the same pages are reused; the cost is that the process keeps its peak heap (the scratch of one
batch) resident until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory (one arena, no mmap, no trimming); True if it was applied.

    Call it before JAX starts its CPU backend (before the first `jax.devices()` or computation): worker threads
    that already have an arena of their own keep mmapping large blocks. The `dn2` command calls it at start-up.
    A no-op off glibc, and when the environment sets any of MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_,
    MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES (the user's settings win).
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _ENV):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl and others: their allocators have no such options
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
