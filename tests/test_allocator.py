"""allocator.keep_freed_memory: a process that frees and reallocates the same large tensors stops faulting pages in."""
import json
import os
import platform
import subprocess
import sys

import pytest

from pipeline.platform import allocator

glibc_only = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                                reason="glibc's malloc")

# glibc's malloc itself, without torch's allocations in between: a "step" allocates 24 MiB in four blocks, touches
# them and frees them together. Default glibc, adapted to a freed 8 MiB block, trims the 24 MiB heap top (above its
# 16 MiB trim threshold) and faults all of it back in next step.
CHILD = """
import ctypes, json, resource, sys
from pipeline.platform import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 2**20
def step():  # what a training step does to the heap: allocate its tensors, touch them, free them all
    blocks = [libc.malloc(6 * MB) for _ in range(4)]
    for b in blocks:
        ctypes.memset(b, 1, 6 * MB)
    for b in blocks:
        libc.free(b)
libc.free(libc.malloc(8 * MB))  # as glibc adapts: its mmap threshold becomes 8 MiB, its trim threshold 16 MiB
out = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": out}))
"""


def _child(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environ, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _child("default"), _child("keep")
    assert kept["applied"] is True
    # Default glibc faults 24 MiB in every step: 6,144 pages of 4 KiB (fewer with transparent huge pages).
    assert all(f >= 12 for f in default["faults"][1:])
    # Kept: the first step grows the heap, later steps reuse it.
    assert kept["faults"][0] >= 12 and kept["faults"][1:] == [0] * 5


@glibc_only
def test_a_users_malloc_settings_are_left_alone():
    assert _child("keep", MALLOC_ARENA_MAX="2")["applied"] is False


@pytest.mark.parametrize("environ, configured", [
    ({}, False),
    ({"PATH": "/usr/bin", "LD_PRELOAD": ""}, False),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, False),
])
def test_user_configured(environ, configured):
    assert allocator._user_configured(environ) is configured
