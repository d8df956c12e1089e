"""The API server's heap, kept and touched ahead: a never-seen merge composed in memory the process already has.

A compose allocates tens of MB (the subset's products, the merge's factors on the host) and keeps some (the
subset's basis in the basis cache, a task's frames). With glibc's defaults a block past the mmap threshold is
mapped for it and unmapped when freed, free memory at the top of a heap is handed back to the kernel, and each
thread of the compose pool allocates in an arena of its own. So every compose took fresh pages, each a page
fault and a page the kernel zeroes: 4 000-6 800 for a 2-task demo merge in the server, about a tenth of its
compose stage (docs/BENCHMARKS.md, "First request for a never-seen merge").

- `tunables()`: what `knots-serve serve` puts in GLIBC_TUNABLES before it execs vLLM. glibc reads it once, at
  process start (mallopt from Python comes after the server's threads have their arenas): one arena, the
  largest mmap threshold, no trimming, so memory a compose frees stays in the heap for the next one. vLLM's
  engine processes, forked from the API server, inherit it; a cached request's latency did not change.
- `reserve(nbytes)`: grows the heap by nbytes of touched pages and frees them (the API server calls it once at
  start, `compose_heap_bytes`): what composes keep and what they use for a moment then come out of pages the
  process already has.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "GLIBC_TUNABLES"
SETTINGS = {
    "glibc.malloc.arena_max": 1,
    "glibc.malloc.mmap_threshold": 32 << 20,  # glibc's maximum on 64-bit hosts
    "glibc.malloc.trim_threshold": 1 << 40,
}
CHUNK = 16 << 20  # under the mmap threshold: carved from the heap, not mapped on its own


def tunables(current: str = "") -> str:
    """GLIBC_TUNABLES `current` with SETTINGS added; a setting the operator gave already is kept as given."""
    given = [item for item in current.split(":") if item]
    names = {item.split("=", 1)[0] for item in given}
    return ":".join(given + [f"{k}={v}" for k, v in SETTINGS.items() if k not in names])


def reserve(nbytes: int) -> int:
    """Grow this process's heap by about nbytes of touched pages, then free them; the bytes reserved. 0 where the
    C library is not glibc or this process did not start with the tunables (freed memory would be handed back)."""
    if nbytes <= 0 or platform.libc_ver()[0] != "glibc" or "glibc.malloc.trim_threshold" not in os.environ.get(ENV, ""):
        return 0
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [b for b in (libc.malloc(CHUNK) for _ in range(-(-nbytes // CHUNK))) if b]
    for b in blocks:
        ctypes.memset(b, 0, CHUNK)  # a write: the kernel backs each page now, not in a compose
    for b in reversed(blocks):
        libc.free(b)
    return len(blocks) * CHUNK
