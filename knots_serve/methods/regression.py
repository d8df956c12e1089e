"""Least-squares merges: the merged update that best reproduces every task's outputs on that task's inputs.

For one linear module, task t's update ΔW_t (O×I) and a PSD matrix G_t (I×I) standing for its inputs,
    ΔW = argmin Σ_t w_t·‖(ΔW − ΔW_t)·G_t^½‖²  =  (Σ_t w_t·ΔW_t·G_t)·(Σ_t w_t·G_t)⁻¹.
- RegMean (Jin et al., ICLR 2023): G_t is the mean Gram of the module's input over task t's own examples
  (stats.py), its off-diagonal part shrunk by `reduce` (G̃ = a·G + (1 − a)·diag G), the solve ridged by
  ε·mean(diag H) (ε = RIDGE). For LoRAs it is exact and low-rank: ΔW = Σ_t B_t·(w_t·A_t·G̃_t·H⁻¹), so the
  merged factors are [B_1 … B_T] and the stacked solved A's — but it needs an I×I solve.
- Core-restricted RegMean (`core-regmean`): the same objective with ΔW's rows kept in the span of the
  subset's A's (Q: I×R orthonormal, the Core Space row basis): ΔW = (Σ w_t·ΔW_t·G̃_t·Q)·(Qᵀ·H·Q)⁻¹·Qᵀ, an
  R×R solve (R = Σr), so its cost follows the subset's rank, not I². KnOTS' basis only rotates columns,
  which the unrestricted solution already shares: `knots-regmean` is `regmean`.
- WUDI (Cheng et al., ICML 2025), data-free: each task's own update rows stand in for its inputs,
  G_t = ΔW_tᵀ·ΔW_t/‖ΔW_t‖²_F (reduce = 1). The minimizer is closed-form with a pseudo-inverse: the solution
  whose rows lie in the tasks' row span, which is where the authors' gradient descent from Σ_t ΔW_t
  converges. Made of products with ΔW_tᵀ·ΔW_t, it commutes with orthonormal changes of frame, so it runs on
  a subset's Σr-sized cores like the spectral methods (the same merge in every space).
"""

from __future__ import annotations

import torch

from ..basis import column_range, compact, compact_left, rtol_for

RIDGE = 1e-6  # ε of the ridge ε·mean(diag H)·I: H is PSD and may be singular (unused input directions)


def _ridged_solve(H: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """N·(H + ε·mean(diag H)·I)⁻¹ for symmetric PSD H (N: c×n), by a Cholesky factorization."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    shift = RIDGE * H.diagonal().mean().clamp(min=torch.finfo(H.dtype).tiny)
    L, info = torch.linalg.cholesky_ex(H + shift * eye)
    if int(info):  # not positive definite in this precision: LU handles what Cholesky cannot
        return torch.linalg.solve(H + shift * eye, N.T).T
    return torch.cholesky_solve(N.T, L).T


def regmean(factors, grams, w, *, alpha=1.0, reduce=0.95, restrict=False, **_):
    """RegMean of one module from its tasks' factors [(B_t, A_t)] (ΔW_t = B_t·A_t, scale folded into B_t),
    Grams [stats.Gram] and weights w (n) -> the smallest exact factors (B, A) of the merged ΔW = B·A.
    restrict: rows in the span of the A's (core-regmean, an R×R solve) instead of an I×I solve; its ΔW is
    B·X·Qᵀ with Q orthonormal: (B·X, Qᵀ) when R ≤ O, else compacted through B's QR (compact_left)."""
    B = torch.cat([alpha * B for B, _ in factors], dim=1)
    dtype = B.dtype
    if restrict:
        # I×R orthonormal; an SVD, not a QR: the A's may repeat (a Core basis's shared V_A) or be padded
        Q = column_range(
            torch.cat([A.T for _, A in {id(A): (B, A) for B, A in factors}.values()], dim=1), rtol_for(dtype)
        )
        GQ = [float(wt) * g.reduced_times(Q, reduce) for g, wt in zip(grams, w)]  # w_t·G̃_t·Q, I×R
        H = sum(Q.T @ gq for gq in GQ)
        N = torch.cat([A @ gq for (_, A), gq in zip(factors, GQ)])  # rows w_t·A_t·G̃_t·Q
        X = _ridged_solve(H, N)  # ΔW = B·X·Qᵀ
        if Q.shape[1] <= B.shape[0]:  # rank R ≤ O: Q's rows are already the smallest row basis (B's independent)
            return B @ X, Q.T
        Qb, Rb = torch.linalg.qr(B)
        return compact_left(Qb, Rb @ X, Q)
    Gs = [float(wt) * g.reduced(reduce, dtype) for g, wt in zip(grams, w)]
    H = sum(Gs)
    N = torch.cat([A @ G for (_, A), G in zip(factors, Gs)])
    return compact(B, _ridged_solve(H, N))


def pinv_psd(K: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix: eigenvalues at or below (rtol·0.1)·λ_max are zeros."""
    vals, vecs = torch.linalg.eigh(K)
    top = vals[-1] if vals.numel() else vals.new_zeros(())
    keep = vals > 0.1 * rtol_for(K.dtype) * top if float(top) > 0 else torch.zeros_like(vals, dtype=torch.bool)
    V = vecs[:, keep]
    return (V / vals[keep]) @ V.T


def wudi(X, w, *, alpha=1.0, **_):
    """WUDI's closed form on one module's stack X (n × p × q, ΔW_t = L·X_t·Rᵀ in orthonormal frames):
    α·(Σ_t Y_t·G_t)·(Σ_t G_t)⁺, Y_t = w_t·X_t, G_t = Y_tᵀ·Y_t/‖Y_t‖² (weights scale the updates, as in
    every method here; a zero update drops out)."""
    Y = X if bool((w == 1).all()) else w[:, None, None] * X
    norms = Y.square().sum((1, 2))
    live = norms > 0
    if not bool(live.any()):
        return torch.zeros_like(X[0])
    Y, norms = Y[live], norms[live]
    G = Y.transpose(1, 2) @ Y / norms[:, None, None]  # n × q × q
    N = (Y @ G).sum(0)
    return alpha * N @ pinv_psd(G.sum(0))
