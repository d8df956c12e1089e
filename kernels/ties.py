"""TIES elect + disjoint mean on a stack of already weighted (and DARE-dropped) task rows, given each
task's trim threshold: out_j = mean over { y_ij : |y_ij| ≥ t_i, y_ij ≠ 0, sign(y_ij) = γ_j } where
γ_j = sign(Σ_i trimmed y_ij), zeros resolved to the majority sign(Σ_j γ_j) (Yadav et al. 2023).

The thresholds come from a selection (torch.kthvalue) done before; what is left is elementwise per
column, so the Triton version is two streaming passes over Y: (1) the elected sign per column and the
sum of signs, (2) the disjoint mean. Y is read twice, the output written once: the floor is
2·n·d·sizeof(Y) + d·(4 + sizeof(out)) bytes.
"""

from __future__ import annotations

import torch


def ties_merge_torch(Y: torch.Tensor, thresholds: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """The same two passes as the Triton kernel, over column chunks small enough to stay in cache
    (each elementwise op on a whole long row would stream it from memory again: ~5x slower on a CPU)."""
    n, d = Y.shape
    thr = thresholds.to(Y.dtype).tolist()
    gamma = torch.empty(d, dtype=Y.dtype, device=Y.device)
    out = torch.empty(d, dtype=Y.dtype, device=Y.device)
    zero = Y.new_zeros(())
    for c in range(0, d, chunk):  # pass 1: the elected sign of each column
        total = torch.zeros(min(chunk, d - c), dtype=Y.dtype, device=Y.device)
        for i in range(n):
            y = Y[i, c : c + chunk]
            total += torch.where(y.abs() >= thr[i], y, zero)
        torch.sign(total, out=gamma[c : c + chunk])
    majority = gamma.sum().sign()  # columns whose trimmed sum is exactly 0 take the majority sign
    gamma.masked_fill_(gamma == 0, majority)
    for c in range(0, d, chunk):  # pass 2: the mean of the kept entries that agree with it
        g = gamma[c : c + chunk]
        total, count = torch.zeros_like(g), torch.zeros_like(g)
        for i in range(n):
            y = Y[i, c : c + chunk]
            keep = (y.abs() >= thr[i]) & (y * g > 0)  # nonzero, kept by the trim, of the elected sign
            total += torch.where(keep, y, zero)
            count += keep
        torch.div(total, count.clamp_(min=1), out=out[c : c + chunk])
    return out


try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the torch path serves everything
    triton = None

if triton is not None:

    @triton.jit
    def _elect(Y, thr, gamma, gsum, n, d, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(n):
            t = tl.load(thr + i)
            y = tl.load(Y + i * d + cols, mask=inside, other=0.0).to(tl.float32)
            total += tl.where(tl.abs(y) >= t, y, 0.0)
        g = tl.where(total > 0, 1.0, tl.where(total < 0, -1.0, 0.0))
        tl.store(gamma + cols, g, mask=inside)
        tl.atomic_add(gsum, tl.sum(tl.where(inside, g, 0.0), axis=0))

    @triton.jit
    def _disjoint_mean(Y, thr, gamma, gsum, out, n, d, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        s = tl.load(gsum)
        majority = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
        g = tl.load(gamma + cols, mask=inside, other=0.0)
        g = tl.where(g == 0, majority, g)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        count = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(n):
            t = tl.load(thr + i)
            y = tl.load(Y + i * d + cols, mask=inside, other=0.0).to(tl.float32)
            keep = (tl.abs(y) >= t) & (y != 0) & (tl.where(y > 0, 1.0, -1.0) == g)
            total += tl.where(keep, y, 0.0)
            count += tl.where(keep, 1.0, 0.0)
        tl.store(out + cols, (total / tl.maximum(count, 1.0)).to(out.dtype.element_ty), mask=inside)


def ties_merge_triton(Y: torch.Tensor, thresholds: torch.Tensor, block: int = 1024) -> torch.Tensor:
    n, d = Y.shape
    Y = Y.contiguous()
    thr = thresholds.to(device=Y.device, dtype=torch.float32).contiguous()
    gamma = torch.empty(d, device=Y.device, dtype=torch.float32)
    gsum = torch.zeros(1, device=Y.device, dtype=torch.float32)
    out = torch.empty(d, device=Y.device, dtype=Y.dtype)
    grid = (triton.cdiv(d, block),)
    _elect[grid](Y, thr, gamma, gsum, n, d, BLOCK=block)
    _disjoint_mean[grid](Y, thr, gamma, gsum, out, n, d, BLOCK=block)
    return out
