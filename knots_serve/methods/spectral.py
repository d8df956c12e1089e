"""Spectral methods: Iso-C, Iso-CTS, TSV-M and CART, built from singular vectors of one module's updates.

Each takes X (n × p × q: one matrix per task, the coordinates of its ΔW_t in orthonormal frames L, R with
ΔW_t = L·X_t·Rᵀ) and per-task weights w (n), and returns the merged matrix (p × q) in the same frames. All
four are made of sums, SVDs and polar factors, so they commute with orthonormal changes of frame: the
dense ΔW_t (L = R = I) and the small cores of a subset's factors (compose.py) give the same ΔW. That is why
they are exact and cheap in every space; the float64 reference (tests/reference.py) is the dense definition.

Singular values at or below rtol·σ_max are numerical zeros (the rank of a sum of LoRAs is at most Σr, not
min(O, I); averaging zeros into a spectrum would shrink it, and arbitrary null-space vectors would make a
polar factor depend on the frame).
"""

from __future__ import annotations

import math

import torch

from ..basis import rtol_for


def _svd(M: torch.Tensor):
    """Thin SVD of M, computed on its block of nonzero rows and columns (exact: zero rows and columns add
    nothing). A task's core C_t = Rb_t·Ra_tᵀ is zero outside the leading rows and columns that the tasks up
    to t span (Rb, Ra are triangular), so most of a subset's per-task SVDs are of small blocks."""
    rows, cols = M.any(dim=1), M.any(dim=0)
    if bool(rows.all()) and bool(cols.all()):
        return torch.linalg.svd(M, full_matrices=False)
    u, s, vh = torch.linalg.svd(M[rows][:, cols], full_matrices=False)
    U = M.new_zeros(M.shape[0], s.numel())
    Vh = M.new_zeros(s.numel(), M.shape[1])
    U[rows], Vh[:, cols] = u, vh
    return U, s, Vh


def _rank(s: torch.Tensor, top) -> int:
    """How many of the (descending) singular values s are above the numerical-zero cutoff of `top`."""
    top = float(top)
    return int((s > rtol_for(s.dtype) * top).sum()) if top > 0 else 0


def polar(M: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): P·Qᵀ for the thin SVD M = P·Σ·Qᵀ."""
    P, _, Qh = _svd(M)
    return P @ Qh


def isotropic(M: torch.Tensor) -> torch.Tensor:
    """M with its nonzero singular values replaced by their mean: mean(σ_1..σ_R)·U_R·V_Rᵀ."""
    U, s, Vh = _svd(M)
    R = _rank(s, s[0]) if s.numel() else 0
    return s[:R].mean() * U[:, :R] @ Vh[:R] if R else torch.zeros_like(M)


def isotropic_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`isotropic(B·A)` as factors, without forming B·A: QR of B and of Aᵀ, then an SVD of the r × r core."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, s, Vh = _svd(Rb @ Ra.T)
    R = _rank(s, s[0]) if s.numel() else 0
    return Qb @ U[:, :R] * (s[:R].mean() if R else 0.0), Vh[:R] @ Qa.T


def _weighted(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return X if bool((w == 1).all()) else w[:, None, None] * X


def iso_c(X, w, *, alpha=1.0, **_):
    """Iso-C: the task-arithmetic sum with its spectrum flattened to its mean."""
    return alpha * isotropic(_weighted(X, w).sum(0))


def iso_cts(X, w, *, alpha=1.0, common=0.8, **_):
    """Iso-CTS: the sum's top k directions (the common subspace) plus `per` top directions of each task's
    residual outside it, k + n·per = R = rank of the sum; both stacks of singular vectors orthogonalized
    (polar), one isotropic scale: the mean of the stacked singular values. common = 1 is Iso-C."""
    Y = _weighted(X, w)
    n = Y.shape[0]
    U, s, Vh = _svd(Y.sum(0))
    R = _rank(s, s[0]) if s.numel() else 0
    if R == 0:
        return torch.zeros_like(Y[0])
    per = min(round((R - math.floor(common * R)) / n), R // n)
    k = R - n * per
    lefts, rights, sigmas = [U[:, :k]], [Vh[:k].T], [s[:k]]
    if per:
        common_dirs = U[:, :k]
        for Yt in Y:
            Ut, st, Vht = _svd(Yt - common_dirs @ (common_dirs.T @ Yt))
            j = min(per, _rank(st, s[0]))  # a residual with fewer nonzero directions gives only those
            lefts.append(Ut[:, :j])
            rights.append(Vht[:j].T)
            sigmas.append(st[:j])
    sig = torch.cat(sigmas)
    return alpha * sig.mean() * polar(torch.cat(lefts, dim=1)) @ polar(torch.cat(rights, dim=1)).T


def tsv(X, w, *, alpha=1.0, keep=1.0, **_):
    """TSV-M: each task's top k_t = max(1, ⌊keep·r_t⌋) singular triplets (r_t: its rank here), the stacked
    left and right singular vectors decorrelated by polar factors. One task at keep = 1 is that task."""
    lefts, rights, sigmas = [], [], []
    for Yt in _weighted(X, w):
        Ut, st, Vht = _svd(Yt)
        r = _rank(st, st[0]) if st.numel() else 0
        k = max(1, math.floor(keep * r)) if r else 0
        lefts.append(Ut[:, :k])
        rights.append(Vht[:k].T)
        sigmas.append(st[:k])
    sig = torch.cat(sigmas)
    if sig.numel() == 0:
        return torch.zeros_like(X[0])
    return alpha * (polar(torch.cat(lefts, dim=1)) * sig) @ polar(torch.cat(rights, dim=1)).T


def cart(X, w, *, alpha=1.0, rank=0.08, **_):
    """CART: the mean m plus alpha times the sum of each task's centered update ΔW_t − m cut to its best
    rank-k approximation, k = max(1, ⌊rank·R'⌋), R' the rank of the stacked updates [ΔW_1 | … | ΔW_n]."""
    Y = _weighted(X, w)
    m = Y.mean(0)
    stacked = torch.cat(list(Y), dim=1)
    stacked = torch.linalg.svdvals(stacked[:, stacked.any(dim=0)])  # zero columns (see _svd) add nothing
    R = _rank(stacked, stacked[0]) if stacked.numel() else 0
    k = max(1, math.floor(rank * R))
    out = m.clone()
    for Yt in Y:
        out += alpha * best_rank(Yt - m, k)
    return out


def best_rank(D: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation U_k·U_kᵀ·D, U_k the top k eigenvectors of D·Dᵀ (p × p: cheaper than an
    SVD of D; directions of a zero eigenvalue contribute nothing, whichever the solver returns)."""
    if k >= min(D.shape):
        return D
    if D.shape[0] > D.shape[1]:
        return best_rank(D.T, k).T
    _, V = torch.linalg.eigh(D @ D.T)
    Uk = V[:, -k:]
    return Uk @ (Uk.T @ D)
