"""W = W0 + α·L·R in one pass, written into a (possibly strided) slice of a live weight.

L is U·Σ (O×k) and R the merged V block (k×I), k ≤ a few hundred: the product is never materialized
in memory; each output tile reads its W0 tile, an O-tile of L and an I-tile of R, accumulates in fp32
and writes W once. The floor is the weight traffic: O·I·(sizeof(W0) + sizeof(W)) bytes (plus L and R,
which are (O+I)·k — small).
"""

from __future__ import annotations

import torch


def lowrank_update_torch(
    W0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out = W0 + alpha·L·R, computed in float32 (float64 if W0 is), cast to out's dtype."""
    acc = torch.float64 if W0.dtype == torch.float64 else torch.float32
    result = (W0.to(acc) + alpha * (L.to(acc) @ R.to(acc))).to(W0.dtype if out is None else out.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _lowrank_update(
        W0,
        L,
        R,
        W,
        alpha,
        M,
        N,
        K,
        s_w0m,
        s_w0n,
        s_lm,
        s_lk,
        s_rk,
        s_rn,
        s_wm,
        s_wn,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            lt = tl.load(
                L + rm[:, None] * s_lm + rk[None, :] * s_lk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
            ).to(tl.float32)
            rt = tl.load(
                R + rk[:, None] * s_rk + rn[None, :] * s_rn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0
            ).to(tl.float32)
            acc += tl.dot(lt, rt, input_precision="ieee")
        inside = (rm[:, None] < M) & (rn[None, :] < N)
        w0 = tl.load(W0 + rm[:, None] * s_w0m + rn[None, :] * s_w0n, mask=inside, other=0.0).to(tl.float32)
        w = w0 + alpha * acc
        tl.store(W + rm[:, None] * s_wm + rn[None, :] * s_wn, w.to(W.dtype.element_ty), mask=inside)


def lowrank_update_triton(
    W0: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    alpha: float,
    out: torch.Tensor | None = None,
    BM: int = 64,
    BN: int = 64,
    BK: int = 32,
) -> torch.Tensor:
    M, N = W0.shape
    K = L.shape[1]
    out = torch.empty_like(W0) if out is None else out
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _lowrank_update[grid](
        W0, L, R, out, float(alpha), M, N, K, *W0.stride(), *L.stride(), *R.stride(), *out.stride(), BM=BM, BN=BN, BK=BK
    )
    return out
