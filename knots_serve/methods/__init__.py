"""Merge methods: small pure functions on stacks of per-task tensors, and the one registry that names them.

Three kinds share the registry (`Method.acts_on`):
- "rows" (sparse.py: TA, TIES, DARE, magnitude): X is n × d, one flattened row per task, merged entry by
  entry; a global TIES trim hands the method all of a task's modules as one row.
- "matrices" (spectral.py: Iso-C, Iso-CTS, TSV-M, CART; optimized.py: DOGE): one module's stack n × p × q,
  merged through its singular vectors (DOGE: a list of every module's stack, for its global mask).
- "factors" (regression.py: RegMean): one module's per-task factors (B_t, A_t) and input Grams (`data`:
  the task statistics of stats.py), merged by a least-squares solve into factors (B, A).
Every method runs in every space. For the row methods and DOGE the space decides what X is (basis.py). TA
and the spectral methods commute with orthonormal changes of basis (`invariant`): any exact coordinates of
the updates give the same ΔW, so compose.py hands them the smallest (a core of the subset's factors), and
the space prefix is only a compute path. Every method also takes LiNeS layer scaling (lines.py) and
`isotropize` (its merged update's nonzero spectrum replaced by its mean), applied to the merged update.

Method ids are `<method>` in the dense space and `<space>-<method>` otherwise: `ties`, `knots-ties`,
`core-iso-c`, … — one naming scheme for the CLI, the API, configs and recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..basis import SPACES
from .optimized import doge
from .regression import regmean, wudi
from .sparse import dare, dare_ta, dare_ties, kth_smallest, magnitude, task_arithmetic, ties, trim, trim_thresholds
from .spectral import cart, iso_c, iso_cts, tsv

# re-exported for the tests and benchmarks that check the row methods' pieces
__all__ = ["dare", "kth_smallest", "trim", "trim_thresholds"]


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    low: float
    high: float
    help: str
    low_open: bool = False  # True: the value must be > low
    integer: bool = False

    def check(self, value) -> str | None:
        """None when `value` is valid, else the reason, naming the parameter and its range."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
        if ok and self.low_open and value <= self.low:
            ok = False
        bracket = "(" if self.low_open else "["
        if not ok:
            return f"{self.name}={value!r} is out of range {bracket}{self.low:g}, {self.high:g}]: {self.help}"
        if self.integer and value != int(value):
            return f"{self.name}={value!r} must be an integer in [{self.low:g}, {self.high:g}]: {self.help}"
        return None

    def cast(self, value) -> float | int:
        return int(value) if self.integer else float(value)


PARAMS = {
    p.name: p
    for p in (
        Param("alpha", 1.0, -100.0, 100.0, "scale of the merged update (CART: of the centered residuals)"),
        Param("top_k", 0.2, 0.0, 1.0, "fraction of entries kept per task by the TIES trim (0.2 = top 20%)", True),
        Param("density", 0.5, 0.0, 1.0, "DARE keep probability (drop rate p = 1 - density)", True),
        Param("common", 0.8, 0.0, 1.0, "Iso-CTS: fraction of the spectrum given to the common subspace (1 = Iso-C)"),
        Param("keep", 1.0, 0.0, 1.0, "TSV-M: fraction of each task's singular vectors kept (1 = its whole rank)", True),
        Param("rank", 0.08, 0.0, 1.0, "CART: fraction of the stacked updates' rank kept per centered residual", True),
        Param("eta", 0.07, 0.0, 100.0, "DOGE: task coefficient = eta / the task's update norm", True),
        Param("steps", 400, 0, 10000, "DOGE: Adam steps per module", integer=True),
        Param("lr", 1e-4, 0.0, 1.0, "DOGE: Adam learning rate", True),
        Param("subspace", 1 / 6, 0.0, 1.0, "DOGE: shared subspace size, as a fraction of min(p, q)"),
        Param("mask", 0.3, 0.0, 1.0, "DOGE: fraction of each task's entries kept by the final mask", True),
        Param("lines", 0.0, 0.0, 10.0, "LiNeS depth scaling beta (0 = off): block l gets a + beta*l/(L-1)"),
        Param("isotropize", 0, 0, 1, "1: the merged update's nonzero spectrum replaced by its mean", integer=True),
        Param("reduce", 0.95, 0.0, 1.0, "RegMean: ratio kept of the Grams' off-diagonal part (0 = diagonal only)"),
    )
}
OPTIONS = ("lines", "isotropize")  # taken by every method


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    own_params: tuple[str, ...]
    paper: str
    summary: str
    acts_on: Literal["rows", "matrices", "factors"] = "rows"
    trims: bool = False  # uses a magnitude threshold per task, so the trim scope (global / module) matters
    random: bool = False  # uses DARE's seeded random drop
    linear: bool = False  # a weighted sum of the task updates: merged straight from the factors
    invariant: bool = False  # commutes with orthonormal changes of basis: merged on the smallest exact core
    per_request: bool = True  # cheap enough to compose for a request (DOGE is not: pin or precompute it)
    data: bool = False  # needs each task's input statistics (stats.py): merged from the factors and Grams

    @property
    def params(self) -> tuple[str, ...]:
        return self.own_params + OPTIONS


def per_module(fn):
    """A one-module matrix method as one over every module's stack (the matrices contract)."""

    def each(Xs, w, **kw):
        return [fn(X, w, **kw) for X in Xs]

    return each


_TA = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
_DARE = "Yu et al. 2023, Language Models are Super Mario (DARE), arXiv:2311.03099"
_ISO = "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025, arXiv:2502.04959"  # noqa: E501
_TSV = "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025, arXiv:2412.00081"  # noqa: E501
_CART = "Choi et al. 2024, Revisiting Weight Averaging for Model Merging (CART), arXiv:2412.12153"
_DOGE = "Wei et al. 2025, Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent (DOGE), ICML 2025, arXiv:2501.01230"  # noqa: E501
_REGMEAN = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), ICLR 2023, arXiv:2212.09849"  # noqa: E501
_WUDI = "Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors (WUDI), ICML 2025, arXiv:2503.08099"  # noqa: E501
_SPECTRAL = {"acts_on": "matrices", "invariant": True}
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
        Method(
            "iso-c",
            per_module(iso_c),
            ("alpha",),
            _ISO,
            "the task-arithmetic sum with its nonzero spectrum flattened to its mean",
            **_SPECTRAL,
        ),
        Method(
            "iso-cts",
            per_module(iso_cts),
            ("alpha", "common"),
            _ISO,
            "Iso-C's common subspace (fraction common) plus each task's own residual directions, isotropic",
            **_SPECTRAL,
        ),
        Method(
            "tsv",
            per_module(tsv),
            ("alpha", "keep"),
            _TSV,
            "TSV-M: each task's top singular vectors (fraction keep), decorrelated by polar factors",
            **_SPECTRAL,
        ),
        Method(
            "cart",
            per_module(cart),
            ("alpha", "rank"),
            _CART,
            "the mean update plus alpha * the low-rank (fraction rank) parts of each centered update",
            **_SPECTRAL,
        ),
        Method(
            "wudi",
            per_module(wudi),
            ("alpha",),
            _WUDI,
            "data-free least squares: each task's update rows stand in for its inputs (closed form)",
            **_SPECTRAL,
        ),
        Method(
            "regmean",
            regmean,
            ("alpha", "reduce"),
            _REGMEAN,
            "least squares on each task's own inputs (its statistics); core-regmean: rows in the tasks' A-span",
            acts_on="factors",
            data=True,
        ),
        Method(
            "doge",
            doge,
            ("alpha", "eta", "steps", "lr", "subspace", "mask"),
            _DOGE,
            "data-free Adam on a shared correction, projected off the tasks' shared subspace, then masked",
            acts_on="matrices",
            trims=True,
            per_request=False,
        ),
    )
}

SPACE_PAPERS = {
    "full": "dense per-task updates ΔW_i = s_i B_i A_i (the classic baselines)",
    "knots": "Stoica et al. 2025, Model merging with SVD to tie the Knots (KnOTS), ICLR 2025, arXiv:2410.19735",
    "core": "Panariello et al. 2025, Accurate and Efficient Low-Rank Model Merging in Core Space, arXiv:2509.17786",
}
OPTION_PAPERS = {
    "lines": "Wang et al. 2025, LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, "
    "ICLR 2025, arXiv:2410.17146",
    "isotropize": "as Iso-C (Marczak et al. 2025) and the Core Space authors, on any method's merged update",
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


def factored(method: Method) -> bool:
    """Merged straight from the tasks' factors whatever the space (TA, the spectral methods, RegMean)."""
    return method.linear or method.invariant or method.data


def full_rank(method_id: str) -> bool:
    """A merge whose result is a dense, full-rank ΔW in general (a dense-space trim, drop or DOGE): pinned
    as ΔW, served as a LoRA only truncated; every other merge is an exact low-rank product."""
    space, method = resolve(method_id)
    return space == "full" and not factored(method)
