"""Composition: a task subset + a merge spec + a basis -> the merged update, as LoRA factors or dense ΔW."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch

from .adapters import LoraAdapter
from .basis import Basis, compact
from .methods import PARAMS, resolve

TrimScope = Literal["global", "module"]


class MergeError(ValueError):
    """A merge request that cannot be carried out; the message names the problem."""


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how. `params` holds the method's numeric parameters (alpha, top_k, density);
    missing ones take the registry defaults. `weights` are per-task (default 1)."""

    tasks: tuple[str, ...]
    method: str = "knots-ties"
    params: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    trim_scope: TrimScope = "global"

    def __post_init__(self):
        try:
            _, method = resolve(self.method)
        except ValueError as e:
            raise MergeError(str(e)) from None
        if not self.tasks:
            raise MergeError("empty task subset: name at least one task")
        dupes = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dupes:
            raise MergeError(f"duplicate tasks in subset: {', '.join(dupes)}")
        for name, value in self.params.items():
            if name not in method.params:
                raise MergeError(
                    f"method {self.method!r} takes no parameter {name!r} (it takes {', '.join(method.params)})"
                )
            p = PARAMS[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high
            if not ok or (p.low_open and value <= p.low):
                bracket = "(" if p.low_open else "["
                raise MergeError(f"{name}={value!r} is out of range {bracket}{p.low}, {p.high}]: {p.help}")
        for t, w in self.weights.items():
            if t not in self.tasks:
                raise MergeError(f"weight given for {t!r}, which is not in the subset {list(self.tasks)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not -100 <= w <= 100:
                raise MergeError(f"weight for {t!r} must be a number in [-100, 100], got {w!r}")
        if self.trim_scope not in ("global", "module"):
            raise MergeError(f"trim_scope must be 'global' or 'module', got {self.trim_scope!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise MergeError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    def resolved_params(self) -> dict[str, float]:
        _, method = resolve(self.method)
        return {p: float(self.params.get(p, PARAMS[p].default)) for p in method.params}

    def key(self) -> str:
        """Canonical identity: equal merges (task order, default values spelled out or not) share one key."""
        _, method = resolve(self.method)
        doc = {
            "tasks": sorted(self.tasks),
            "method": self.method,
            "params": self.resolved_params(),
            "weights": {t: float(self.weights.get(t, 1.0)) for t in sorted(self.tasks)},
        }
        if method.random:
            doc["seed"] = self.seed
        if method.trims:
            doc["trim_scope"] = self.trim_scope
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def merged_tensors(
    basis: Basis, spec: MergeSpec, progress: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Merge the subset's per-task tensors, module by module (or over all modules at once for a global
    trim, whose threshold is per task over the whole model, as in the TIES and KnOTS references).
    Runs in `dtype` (float32 serves; the float64 reference tests pass float64) on the basis's device."""
    space, method = resolve(spec.method)
    if basis.space != space:
        raise MergeError(f"method {spec.method!r} needs a {space!r} basis, this one is {basis.space!r}")
    _check_tasks(basis, spec)
    names, device = list(spec.tasks), basis.device
    w = torch.tensor([float(spec.weights.get(t, 1.0)) for t in names], dtype=dtype, device=device)
    kwargs = dict(spec.resolved_params())
    if method.random:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(spec.seed)
    modules = [m for m, ms in basis.modules.items() if any(t in ms.tasks for t in names)]
    shapes = {m: basis.modules[m].tensor_shape for m in modules}
    if method.trims and spec.trim_scope == "global" and modules:
        # one buffer over all modules, filled in place (no per-module stacks, no concatenation)
        sizes = [shapes[m][0] * shapes[m][1] for m in modules]
        X = torch.empty(len(names), sum(sizes), dtype=dtype, device=device)
        for m, piece in zip(modules, X.split(sizes, dim=1)):
            piece.copy_(basis.modules[m].stack(names, dtype).flatten(1))
        pieces = method.fn(X, w, **kwargs).split(sizes)
        return {m: p.view(shapes[m]) for m, p in zip(modules, pieces)}
    items = modules
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(modules, desc=spec.method, unit="module")
    return {m: method.fn(basis.modules[m].stack(names, dtype).flatten(1), w, **kwargs).view(shapes[m]) for m in items}


def merge_lora(
    basis: Basis,
    spec: MergeSpec,
    max_rank: int | None = 512,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The merge as exact LoRA factors {module: (B, A)} with ΔW = B·A (scale 1), in `dtype` on the
    basis's device.

    Exact in the knots and core spaces; in the dense space a merged ΔW of rank > max_rank is truncated
    to its top max_rank singular directions (None: never; use dense output for an exact dense merge).
    A linear merge (TA) in the knots or core space goes straight from the tasks' factors (`linear_merge`)."""
    space, method = resolve(spec.method)
    if method.linear and space != "full" and basis.space == space:
        _check_tasks(basis, spec)
        factors = {m: {t: ms.task_factors(t) for t in spec.tasks if t in ms.tasks} for m, ms in basis.modules.items()}
        return linear_merge(factors, spec, dtype)
    merged = merged_tensors(basis, spec, progress, dtype)
    # a module whose merge is zero keeps rank 0 (written as zero padding): every adapted module stays listed
    return {m: basis.modules[m].to_lora(X, max_rank) for m, X in merged.items()}


def _check_tasks(basis: Basis, spec: MergeSpec) -> None:
    unknown = [t for t in spec.tasks if t not in basis.tasks]
    if unknown:
        raise MergeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(basis.tasks)}")


def adapter_factors(adapters: dict[str, LoraAdapter], tasks) -> dict[str, dict[str, tuple]]:
    """{module: {task: (s_i·B_i, A_i)}} of the named adapters, where their tensors are."""
    out: dict[str, dict[str, tuple]] = {}
    for t in tasks:
        for m, lora in adapters[t].modules.items():
            out.setdefault(m, {})[t] = (lora.scale * lora.B, lora.A)
    return dict(sorted(out.items()))


def linear_merge(
    factors: dict[str, dict[str, tuple]], spec: MergeSpec, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TA (`ta`, `knots-ta`, `core-ta`: equal in every space) from factors {module: {task: (B_i, A_i)}}
    with ΔW_i = B_i·A_i: ΔW = α·Σ w_i B_i A_i = [α·w_1·B_1 | …]·[A_1; …], compacted once per module.
    No basis, no stacking: the cost is the subset's (Σr_i·(O+I) per module), whatever the pool."""
    _, method = resolve(spec.method)
    if not method.linear:
        raise MergeError(f"{spec.method!r} is not a linear merge")
    alpha = spec.resolved_params()["alpha"]
    out = {}
    for m, per_task in factors.items():
        if not per_task:
            continue
        B = torch.cat([(alpha * spec.weights.get(t, 1.0)) * B.to(dtype) for t, (B, _) in per_task.items()], dim=1)
        A = torch.cat([A.to(dtype) for _, A in per_task.values()], dim=0)
        out[m] = compact(B, A)
    return out


def to_host(lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors on another device -> on the CPU in one copy (one flat buffer, not a transfer per tensor)."""
    tensors = [t for pair in lora.values() for t in pair]
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return lora
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    views = iter(flat.split([t.numel() for t in tensors]))
    return {m: (next(views).view(B.shape), next(views).view(A.shape)) for m, (B, A) in lora.items()}


def merge_dense(
    basis: Basis, spec: MergeSpec, progress: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The merge as dense float64 ΔW per module (for writing a merged full model)."""
    merged = merged_tensors(basis, spec, progress, dtype)
    return {m: basis.modules[m].to_dense(X) for m, X in merged.items()}
