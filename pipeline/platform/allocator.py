"""Keep freed host memory for reuse instead of handing it back to the kernel after a step (glibc only).

glibc's malloc serves blocks above a threshold with mmap and unmaps them on free, and trims the heap whenever more
than twice that threshold lies free at its top. The threshold adapts (128 KiB at first, then the size of the largest
freed mmapped block, up to 32 MiB), but a training step frees its activations, weight casts and gradients all at once,
so the heap is trimmed every step and the next step faults that memory back in, page by page, zero-filled by the
kernel: resnet18 at 64 px, batch 32, took 12,500 page faults per fp32 step and 7,500-8,500 per bf16 step, 20-42 ms
of kernel time (`python benchmarks/allocator.py` measures it). `keep_freed_memory` sets the threshold to glibc's
largest, 32 MiB, and turns trimming off: what glibc's adaptation ends at, without giving the heap back. At 64 px no step
then faults; larger blocks (activations of large images) are still mapped and unmapped each time. The cost: the process
keeps the heap of its peak (measured in resnet18 training loops: 4% more resident memory at 64 px, 2% at 128 px).

Users who chose their own allocator (jemalloc or tcmalloc via LD_PRELOAD) or glibc settings (MALLOC_* variables,
GLIBC_TUNABLES) keep them.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory: blocks up to 32 MiB from the heap, no trimming. Returns whether it
    applied (False elsewhere than Linux with glibc, or where the user set up the allocator). Idempotent."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _apply() -> bool:
    if not sys.platform.startswith("linux") or _user_configured(os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt (musl's is a stub) mean other things
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Freed blocks stay in the heap for the next step.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _user_configured(environ) -> bool:
    return (any(k.startswith("MALLOC_") for k in environ) or "malloc" in environ.get("LD_PRELOAD", "")
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))
