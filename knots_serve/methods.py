"""Merge methods: small pure functions on a stack of per-task tensors, and the registry that names them.

Every method takes X (n × d: one flattened row per task) and per-task weights w (n), and returns the
merged row (d). The same function runs in every space (dense ΔW, KnOTS, Core); the space only decides
what X is (see basis.py). Method ids are `<method>` in the dense space and `<space>-<method>` otherwise:
`ties`, `knots-ties`, `core-dare-ties`, … — one naming scheme for the CLI, the API and configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .basis import SPACES
from .kernels import abs_thresholds, ties_merge

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
    return alpha * ties_merge(Y, trim_thresholds(Y, top_k))


def dare_ta(X, w, *, alpha=1.0, density=0.5, generator=None, **_):
    return task_arithmetic(dare(X, density, generator), w, alpha=alpha)


def dare_ties(X, w, *, alpha=1.0, top_k=0.2, density=0.5, generator=None, **_):
    return ties(dare(X, density, generator), w, alpha=alpha, top_k=top_k)


def magnitude(X, w, *, alpha=1.0, top_k=0.2, **_):
    return alpha * trim(w[:, None] * X, top_k).sum(0)


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    low: float
    high: float
    help: str
    low_open: bool = False  # True: the value must be > low


PARAMS = {
    p.name: p
    for p in (
        Param("alpha", 1.0, -100.0, 100.0, "scale of the merged update"),
        Param("top_k", 0.2, 0.0, 1.0, "fraction of entries kept per task by the TIES trim (0.2 = top 20%)", True),
        Param("density", 0.5, 0.0, 1.0, "DARE keep probability (drop rate p = 1 - density)", True),
    )
}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]
    paper: str
    summary: str
    trims: bool = False  # uses the TIES trim, so the trim scope (global / module) matters
    random: bool = False  # uses DARE's seeded random drop
    linear: bool = False  # a weighted sum of the task updates: the same in every space, merged from the factors


_TA = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
_DARE = "Yu et al. 2023, Language Models are Super Mario (DARE), arXiv:2311.03099"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ta", task_arithmetic, ("alpha",), _TA, "task arithmetic: alpha * sum_i w_i X_i", linear=True),
        Method(
            "ties",
            ties,
            ("alpha", "top_k"),
            _TIES,
            "trim to top_k per task, elect a sign per entry, mean of the agreeing entries",
            trims=True,
        ),
        Method(
            "dare-ta",
            dare_ta,
            ("alpha", "density"),
            _DARE,
            "random drop (keep prob. density, rescaled), then task arithmetic",
            random=True,
        ),
        Method(
            "dare-ties",
            dare_ties,
            ("alpha", "top_k", "density"),
            f"{_DARE}; {_TIES}",
            "random drop, then TIES",
            trims=True,
            random=True,
        ),
        Method(
            "magnitude",
            magnitude,
            ("alpha", "top_k"),
            "magnitude pruning (TIES trim without sign election)",
            "keep the top_k entries per task by magnitude, then sum",
            trims=True,
        ),
    )
}

SPACE_PAPERS = {
    "full": "dense per-task updates ΔW_i = s_i B_i A_i (the classic baselines)",
    "knots": "Stoica et al. 2025, Model merging with SVD to tie the Knots (KnOTS), ICLR 2025, arXiv:2410.19735",
    "core": "Panariello et al. 2025, Accurate and Efficient Low-Rank Model Merging in Core Space, arXiv:2509.17786",
}


def method_ids() -> list[str]:
    return [m if s == "full" else f"{s}-{m}" for s in SPACES for m in METHODS]


def resolve(method_id: str) -> tuple[str, Method]:
    """'knots-dare-ties' -> ('knots', METHODS['dare-ties'])."""
    space, _, rest = method_id.partition("-")
    if space in SPACES and space != "full" and rest in METHODS:
        return space, METHODS[rest]
    if method_id in METHODS:
        return "full", METHODS[method_id]
    raise ValueError(f"unknown merge method {method_id!r}; choose one of: {', '.join(method_ids())}")
