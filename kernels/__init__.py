"""Compute kernels of the compose path: Triton on GPUs, numba on CPUs (cpu.py), torch everywhere else
and as the reference.

Installed as `knots_serve.kernels` (see pyproject.toml), never as a top-level `kernels` package: that name
belongs to Hugging Face's `kernels`, which transformers probes for at import time.
Kernels know tensors, not tasks: callers pass stacked rows, thresholds and factors.
"""

from __future__ import annotations

import torch

from . import cpu
from .lowrank_update import lowrank_update_torch, lowrank_update_triton, triton
from .ties import ties_merge_torch, ties_merge_triton


def _triton_for(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def ties_merge(Y: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint mean of weighted rows Y (n × d) trimmed at per-row thresholds (n)."""
    if _triton_for(Y):
        return ties_merge_triton(Y, thresholds)
    return cpu.ties_merge_numba(Y, thresholds) if cpu.available(Y) else ties_merge_torch(Y, thresholds)


def abs_thresholds(X: torch.Tensor, k: int) -> torch.Tensor | None:
    """Per row of X, the k-th smallest |x| (exact) from the fused CPU kernel; None where it does not run."""
    if not cpu.available(X):
        return None
    return cpu.kth_abs_smallest(X, k)


def row_sq_norms(X: torch.Tensor) -> torch.Tensor:
    """Σ_j x_ij² per row of X (… × cols), accumulated in float64 (no float32 underflow: a row is 0 only if it
    is empty); one pass at memory speed on the CPU, where a float64 copy of X costs 20× more."""
    if cpu.available(X):
        return cpu.row_sq_norms(X)
    return X.to(torch.float64).square().sum(-1)


def column_shares(X: torch.Tensor, row_sq_norms: torch.Tensor) -> torch.Tensor:
    """Σ_i x_ij² / ‖x_i‖² per column of each matrix of X (… × rows × cols; empty rows add nothing), in
    float64: how much of the rows' energy each column holds, each row counted once whatever its scale."""
    if cpu.available(X):
        return cpu.column_shares(X, row_sq_norms)
    inv = torch.where(row_sq_norms > 0, 1 / row_sq_norms, 0)
    return (X.to(torch.float64).square() * inv[..., None]).sum(-2)


def lowrank_update(
    W0: torch.Tensor, L: torch.Tensor, R: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """out = W0 + alpha·L·R without materializing L·R (Triton) — out may be a strided slice of a weight."""
    if _triton_for(W0):
        return lowrank_update_triton(W0, L, R, alpha, out)
    return lowrank_update_torch(W0, L, R, alpha, out)
