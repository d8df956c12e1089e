"""Row methods: task arithmetic, TIES, DARE and magnitude pruning, entry by entry.

Each takes X (n × d: one flattened row per task) and per-task weights w (n), and returns the merged row
(d). The same function runs in every space (dense ΔW, KnOTS, Core); the space only decides what X is
(basis.py). A global TIES trim hands a method all of a task's modules as one row (compose.py).
"""

from __future__ import annotations

import torch

from ..kernels import abs_thresholds, ties_merge

SAMPLE = 1 << 16  # rows longer than 4·SAMPLE are selected through a sampled bracket (kth_smallest)


def kth_smallest(A: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of A (n × d), the k-th smallest value (1-based): exactly A.kthvalue(k, dim=1).values.

    A full selection on a long row is slow (quickselect, ~60 ns an entry on this CPU). A seeded sample
    brackets the answer instead; one pass counts the entries below the bracket and the selection runs only
    on the few inside it. A bracket that misses the k-th entry falls back to the full selection."""
    n, d = A.shape
    if d <= 4 * SAMPLE:
        return A.kthvalue(k, dim=1).values
    idx = torch.randint(d, (SAMPLE,), generator=torch.Generator().manual_seed(0)).to(A.device)
    sample = A[:, idx].sort(dim=1).values
    p = k / d
    j, margin = round(p * SAMPLE), int(6 * (SAMPLE * p * (1 - p)) ** 0.5) + 16
    lo, hi = sample[:, max(j - margin, 0)], sample[:, min(j + margin, SAMPLE - 1)]
    out = torch.empty(n, dtype=A.dtype, device=A.device)
    for i, row in enumerate(A):
        below = int((row < lo[i]).sum())
        inside = row[(row >= lo[i]) & (row <= hi[i])]
        ok = below < k <= below + inside.numel()
        out[i] = inside.kthvalue(k - below).values if ok else row.kthvalue(k).values
    return out


def trim_thresholds(X: torch.Tensor, top_k: float) -> torch.Tensor:
    """TIES trim threshold per row: the (d − ⌊d·top_k⌋)-th smallest |x|; entries with |x| ≥ it are kept.

    As in the TIES and KnOTS reference code, this keeps ⌊d·top_k⌋ + 1 entries (more on ties)."""
    d = X.shape[1]
    k = d - int(d * top_k)
    if k <= 0:
        return torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
    fused = abs_thresholds(X, k)
    return fused if fused is not None else kth_smallest(X.abs(), k)


def trim(X: torch.Tensor, top_k: float) -> torch.Tensor:
    return torch.where(X.abs() >= trim_thresholds(X, top_k)[:, None], X, X.new_zeros(()))


def dare(X: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept ones by 1/density.
    The mask is drawn on X's device by `generator` (which must live there): for one seed it is the same
    on every machine of one device type, not between CPU and CUDA (their generators differ)."""
    if density >= 1:
        return X
    keep = torch.rand(X.shape, generator=generator, dtype=torch.float32, device=X.device) < density
    return torch.where(keep, X / density, X.new_zeros(()))


def task_arithmetic(X, w, *, alpha=1.0, **_):
    return alpha * (w[:, None] * X).sum(0)


def ties(X, w, *, alpha=1.0, top_k=0.2, **_):
    """Trim, elect, disjoint mean (the last two as one kernel: elementwise per column)."""
    Y = X if bool((w == 1).all()) else w[:, None] * X  # the same values; no copy of a large X
    return ties_merge(Y, trim_thresholds(Y, top_k)).mul_(alpha)  # in place: the merged row is as long as X's


def dare_ta(X, w, *, alpha=1.0, density=0.5, generator=None, **_):
    return task_arithmetic(dare(X, density, generator), w, alpha=alpha)


def dare_ties(X, w, *, alpha=1.0, top_k=0.2, density=0.5, generator=None, **_):
    return ties(dare(X, density, generator), w, alpha=alpha, top_k=top_k)


def magnitude(X, w, *, alpha=1.0, top_k=0.2, **_):
    return alpha * trim(w[:, None] * X, top_k).sum(0)
