"""Optimized methods: DOGE (Wei et al., ICML 2025), a data-free projective gradient descent on the merge.

Per module, with X_t the task's tensor in the merge's space (dense ΔW_t, KnOTS R_t or the Core core):
- coefficients λ_t = eta/‖X_t‖_F (the paper's task-aware "adaptive learning rates"; 0 for a task that does
  not adapt the module);
- one correction δ (the shape of X_t, from 0), shared by the tasks: τ = Σ_t λ_t·(X_t + δ);
- loss L(δ) = Σ_j ‖diag((X_j − τ)·X_jᵀ)‖² — each task's update stands in for its input data; the diagonal
  is what the authors' code keeps (not the full Frobenius norm);
- shared subspace U_s: each task's top ⌊r/n⌋ left singular vectors (r = min(p, q), only nonzero ones), stacked,
  their top ⌊subspace·r⌋ left singular vectors; every gradient is projected out of it, g ← (I − U_s·U_sᵀ)·g,
  so the knowledge the tasks share is left alone. Adam scales each entry of its step on its own, which
  would carry δ back into U_s: the step is projected too, so δ stays out of it exactly;
- Adam (lr, `steps` steps), modules independent (the modules of one shape run as one batch);
- mask m_t: |X_t| in the task's top `mask` fraction (over all its modules: trim_scope global, as the authors;
  or per module); ΔW = alpha·Σ_t λ_t·m_t ⊙ (X_t + δ).
The mask and δ act on coordinates, so unlike the spectral methods the space changes what is optimized:
dense DOGE is the paper's (full-rank: pin it), KnOTS/Core DOGE the same recipe on the aligned coordinates
(r the basis's size), exact low-rank factors of the result.
"""

from __future__ import annotations

import math

import torch

from .sparse import trim_thresholds

CHUNK = 1 << 26  # entries of the per-task stacks one batch of modules may hold


def doge_loss(Y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Σ_j ‖diag((Y_j − τ)·Y_jᵀ)‖² for stacks Y (… × n × p × q) and merges τ (… × p × q), per batch entry."""
    return (((Y - tau.unsqueeze(-3)) * Y).sum(-1) ** 2).sum((-1, -2))


def shared_subspace(Y: torch.Tensor, fraction: float) -> torch.Tensor:
    """U_s (… × p × s) of stacks Y (… × n × p × q), with columns of zeros where a direction is absent."""
    n, p, q = Y.shape[-3:]
    r = min(p, q)
    per, keep = r // n, math.floor(fraction * r)
    if per == 0 or keep == 0:
        return Y.new_zeros(*Y.shape[:-3], p, 0)
    U, s, _ = torch.linalg.svd(Y, full_matrices=False)
    cut = 1e-5 if Y.dtype == torch.float32 else 1e-7  # numerical zeros (a LoRA's rank is below r)
    live = s[..., :per] > cut * s[..., :1]
    tops = (U[..., :per] * live.unsqueeze(-2)).transpose(-3, -2).reshape(*Y.shape[:-3], p, n * per)
    Us, ss, _ = torch.linalg.svd(tops, full_matrices=False)
    live = ss[..., :keep] > cut * ss[..., :1].clamp_min(torch.finfo(Y.dtype).tiny)
    return Us[..., :keep] * live.unsqueeze(-2)


def doge_delta(Y: torch.Tensor, lam: torch.Tensor, Us: torch.Tensor, steps: int, lr: float, trace=None):
    """The correction δ (… × p × q) for stacks Y (… × n × p × q), coefficients lam (… × n) and shared
    subspaces Us; `trace`, if a list, gets the loss before each step and after the last."""
    total = lam.sum(-1)[..., None, None]
    base = (lam[..., None, None] * Y).sum(-3)
    delta = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def out_of_shared(M):
        return M - Us @ (Us.transpose(-1, -2) @ M)

    with torch.no_grad():
        for _ in range(steps):
            tau = base + total * delta
            r = ((Y - tau.unsqueeze(-3)) * Y).sum(-1)  # diag((Y_j − τ)·Y_jᵀ), … × n × p
            if trace is not None:
                trace.append((r**2).sum((-1, -2)))
            delta.grad = out_of_shared(-2 * total * (r.unsqueeze(-1) * Y).sum(-3))
            opt.step()
            delta.copy_(out_of_shared(delta))
        if trace is not None:
            trace.append(doge_loss(Y, base + total * delta))
    return delta.detach()


def doge(Xs, w, *, alpha=1.0, eta=0.07, steps=400, lr=1e-4, subspace=1 / 6, mask=0.3, trim_scope="global", **_):
    """DOGE on the modules' stacks Xs (each n × p × q) -> one merged matrix per module."""
    Ys = [X if bool((w == 1).all()) else w[:, None, None] * X for X in Xs]
    deltas: list[torch.Tensor | None] = [None] * len(Ys)
    by_shape: dict[tuple, list[int]] = {}
    for i, Y in enumerate(Ys):
        by_shape.setdefault(tuple(Y.shape), []).append(i)
    lams = []
    for Y in Ys:
        norm = torch.linalg.matrix_norm(Y)
        lams.append(torch.where(norm > 0, eta / norm.clamp_min(torch.finfo(Y.dtype).tiny), torch.zeros_like(norm)))
    for shape, idx in by_shape.items():
        step = max(1, CHUNK // math.prod(shape))
        for j in range(0, len(idx), step):
            batch = idx[j : j + step]
            Y = torch.stack([Ys[i] for i in batch])
            lam = torch.stack([lams[i] for i in batch])
            for i, d in zip(batch, doge_delta(Y, lam, shared_subspace(Y, subspace), int(steps), lr)):
                deltas[i] = d
    if trim_scope == "global":
        th = trim_thresholds(torch.cat([Y.flatten(1) for Y in Ys], dim=1), mask)
        thresholds = [th] * len(Ys)
    else:
        thresholds = [trim_thresholds(Y.flatten(1), mask) for Y in Ys]
    return [
        alpha * (lam[:, None, None] * (Y.abs() >= th[:, None, None]) * (Y + d)).sum(0)
        for Y, d, lam, th in zip(Ys, deltas, lams, thresholds)
    ]
