"""Composition: a task subset + a merge spec + a basis -> the merged update, as LoRA factors or dense ΔW."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import torch

from .adapters import LoraAdapter
from .basis import F64, Basis, compact_lefts, compacts, restack
from .methods import OPTIONS, PARAMS, factored, resolve
from .methods.lines import lines_base, lines_scales
from .methods.spectral import isotropic, isotropic_factors

TrimScope = Literal["global", "module"]


class MergeError(ValueError):
    """A merge request that cannot be carried out; the message names the problem."""


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how. `params` holds the method's numeric parameters (alpha, top_k, common, …, and
    the options lines and isotropize); missing ones take the registry defaults. `weights` are per-task
    (default 1)."""

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
            problem = PARAMS[name].check(value)
            if problem:
                raise MergeError(problem)
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
        """The method's own parameters, defaults spelled out, plus the options (LiNeS, isotropize) that are
        on: a merge without options keeps the key, name and recipe it had before options existed."""
        _, method = resolve(self.method)
        own = {p: PARAMS[p].cast(self.params.get(p, PARAMS[p].default)) for p in method.own_params}
        on = {p: PARAMS[p].cast(v) for p, v in self.params.items() if p in OPTIONS and v != PARAMS[p].default}
        return own | on

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
    """Merge the subset's per-task tensors in the basis's space: a row method module by module (or over
    all modules at once for a global trim, whose threshold is per task over the whole model, as in the TIES
    and KnOTS references), a matrix method on every module's stack (n × p × q) at once.
    Runs in `dtype` (float32 serves; the float64 reference tests pass float64) on the basis's device."""
    space, method = resolve(spec.method)
    if basis.space != space:
        raise MergeError(f"method {spec.method!r} needs a {space!r} basis, this one is {basis.space!r}")
    _check_tasks(basis, spec)
    if method.data:
        raise MergeError(f"{spec.method!r} is composed from the tasks' factors and statistics (merge_factors)")
    names, device = list(spec.tasks), basis.device
    w = _weights(spec, dtype, device)
    kwargs = dict(spec.resolved_params())
    if method.random:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(spec.seed)
    modules = [m for m, ms in basis.modules.items() if any(t in ms.tasks for t in names)]
    shapes = {m: basis.modules[m].tensor_shape for m in modules}
    if not modules:
        return {}
    if method.acts_on == "matrices" or (method.trims and spec.trim_scope == "global"):
        # a spectral method on dense updates (the full space) runs in float64 whatever `dtype`: float32
        # arithmetic on a dense O×I matrix errs by eps·‖M‖ in every direction, and Iso-CTS's polar factor of
        # near-parallel directions amplifies that (up to 9e-4 off the float64 reference in 2% of random pools)
        work = F64 if method.invariant else dtype
        X, cols = task_rows(basis, modules, names, work)  # every module at once: the plan's working set
        if method.acts_on == "matrices":
            stacks = [X[:, cols[m]].view(len(names), *shapes[m]) for m in modules]
            merged = method.fn(stacks, w.to(work), trim_scope=spec.trim_scope, **kwargs)
            return {m: Y.to(dtype) for m, Y in zip(modules, merged)}
        merged = method.fn(X, w, **kwargs)  # one row per task over all modules: a per-task trim threshold
        return {m: merged[cols[m]].view(shapes[m]) for m in modules}
    items = modules
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(modules, desc=spec.method, unit="module")
    # one module's tensors at a time: a per-module method's working set is its largest module (plan)
    return {m: method.fn(task_rows(basis, [m], names, dtype)[0], w, **kwargs).view(shapes[m]) for m in items}


def task_rows(basis: Basis, modules: list[str], names: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The subset's tensors of `modules` as one buffer X (n × Σ sizes: one row per task) and each module's
    columns in it. Modules whose tensors have one shape are laid side by side and filled as one batch
    (KnOTS: X_t = coef_t·Q_tᵀ of all of them by one batched product written in place)."""
    groups: dict[tuple, list[str]] = {}
    for m in modules:
        ms = basis.modules[m]
        parts = tuple(tuple(ms.coef[ms.tasks[t]].shape) if t in ms.tasks else None for t in names)
        groups.setdefault((ms.tensor_shape, parts), []).append(m)
    total = sum(len(ms) * p * q for ((p, q), _), ms in groups.items())
    X = torch.empty(len(names), total, dtype=dtype, device=basis.device)
    cols, start = {}, 0
    for ((p, q), parts), members in groups.items():
        spaces = [basis.modules[m] for m in members]
        end = start + len(members) * p * q
        for row, t, part in zip(X, names, parts):
            piece = row[start:end].view(len(members), p, q)
            if part is None:  # a task without these modules
                piece.zero_()
                continue
            coefs = torch.stack([ms.coef[ms.tasks[t]] for ms in spaces]).to(dtype)
            if basis.space == "knots":
                torch.bmm(coefs, restack([ms.basis_q[ms.tasks[t]] for ms in spaces]).to(dtype).mT, out=piece)
            else:
                piece.copy_(coefs)
        cols.update((m, slice(start + j * p * q, start + (j + 1) * p * q)) for j, m in enumerate(members))
        start = end
    return X, cols


def _weights(spec: MergeSpec, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor([float(spec.weights.get(t, 1.0)) for t in spec.tasks], dtype=dtype, device=device)


def merge_lora(
    basis: Basis,
    spec: MergeSpec,
    max_rank: int | None = 512,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    stats: dict | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The merge as exact LoRA factors {module: (B, A)} with ΔW = B·A (scale 1), in `dtype` on the
    basis's device; `stats` {task: stats.TaskStats} for the data-aware methods.

    Exact in the knots and core spaces; in the dense space a merged ΔW of rank > max_rank is truncated
    to its top max_rank singular directions (None: never; use dense output for an exact dense merge).
    TA and the spectral methods go straight from the factors or cores a KnOTS or Core basis keeps, whatever
    their space prefix: they give the same ΔW in every space."""
    _, method = resolve(spec.method)
    if factored(method) and basis.space != "full":
        _check_tasks(basis, spec)
        if method.linear or method.data:
            return merge_factors(basis_factors(basis, spec.tasks), spec, dtype, stats)
        lora = core_merge(basis_cores(basis, spec.tasks, dtype), spec)
        return finish(lora, spec, lambda: _basis_sum_norm2(basis, spec, dtype))
    merged = merged_tensors(basis, spec, progress, dtype)
    # a module whose merge is zero keeps rank 0 (written as zero padding): every adapted module stays listed
    lora = basis.to_lora(merged, max_rank)
    return finish(lora, spec, lambda: _basis_sum_norm2(basis, spec, dtype))


def _check_tasks(basis: Basis, spec: MergeSpec) -> None:
    unknown = [t for t in spec.tasks if t not in basis.tasks]
    if unknown:
        raise MergeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(basis.tasks)}")


def adapter_factors(
    adapters: dict[str, LoraAdapter], tasks, dtype: torch.dtype | None = None
) -> dict[str, dict[str, tuple]]:
    """{module: {task: (s_i·B_i, A_i)}} of the named adapters, where their tensors are, in `dtype` (default:
    the adapters' own; float64 for a float64 merge: s_i·B_i rounded to float32 first would be an input error)."""
    out: dict[str, dict[str, tuple]] = {}
    for t in tasks:
        for m, lora in adapters[t].modules.items():
            out.setdefault(m, {})[t] = (lora.scale * lora.B.to(dtype), lora.A.to(dtype))
    return dict(sorted(out.items()))


def linear_merge(
    factors: dict[str, dict[str, tuple]], spec: MergeSpec, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TA (`ta`, `knots-ta`, `core-ta`: equal in every space) from factors {module: {task: (B_i, A_i)}}
    with ΔW_i = B_i·A_i: ΔW = α·Σ w_i B_i A_i = [α·w_1·B_1 | …]·[A_1; …], compacted once per module.
    No basis, no stacking: the cost is the subset's (Σr_i·(O+I) per module), whatever the pool."""
    if not resolve(spec.method)[1].linear:
        raise MergeError(f"{spec.method!r} is not a linear merge")
    alpha = spec.resolved_params()["alpha"]
    pairs = {}
    for m, per_task in factors.items():
        if not per_task:
            continue
        B = torch.cat([(alpha * spec.weights.get(t, 1.0)) * B.to(dtype) for t, (B, _) in per_task.items()], dim=1)
        pairs[m] = (B, torch.cat([A.to(dtype) for _, A in per_task.values()], dim=0))
    return compacts(pairs)


Cores = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> (P, Q, stack of C_t)


def factor_cores(factors: dict[str, dict[str, tuple]], tasks, dtype: torch.dtype = torch.float32) -> Cores:
    """The subset's smallest exact coordinates, from factors {module: {task: (B_t, A_t)}}: per module, QRs
    of the stacked B's and of the stacked Aᵀ's give orthonormal frames P (O×Σr), Q (I×Σr) with
    ΔW_t = P·C_t·Qᵀ, C_t = Rb_t·Ra_tᵀ (Σr × Σr; zeros for a task without the module). No O×I matrix is
    formed: the cost is the subset's, Σr·(O+I)·Σr per module, whatever the pool."""
    groups: dict[tuple, list[str]] = {}  # modules with the same tasks and factor shapes: one batch
    for m, per_task in factors.items():
        present = tuple(t for t in tasks if t in per_task)
        if present:
            groups.setdefault(
                (present, tuple(per_task[t][1].shape for t in present), per_task[present[0]][0].shape[0]), []
            ).append(m)
    out = {}
    for (present, shapes, _), ms in groups.items():
        P, Rb = torch.linalg.qr(
            torch.stack([torch.cat([factors[m][t][0] for t in present], dim=1) for m in ms]).to(dtype)
        )
        Q, Ra = torch.linalg.qr(torch.stack([torch.cat([factors[m][t][1] for t in present]) for m in ms]).to(dtype).mT)
        sizes = [r for r, _ in shapes]  # each task's rank
        blocks = dict(zip(present, (b @ a.mT for b, a in zip(Rb.split(sizes, dim=-1), Ra.split(sizes, dim=-1)))))
        zero = Rb.new_zeros(len(ms), Rb.shape[-2], Ra.shape[-2])
        C = torch.stack([blocks.get(t, zero) for t in tasks], dim=1)  # b × n × Σr × Σr
        out.update((m, (P[j], Q[j], C[j])) for j, m in enumerate(ms))
    return {m: out[m] for m in factors if m in out}


def basis_cores(basis: Basis, tasks, dtype: torch.dtype = torch.float32) -> Cores:
    """The same from a basis: Core Space's own frames (U_B, V_A) and cores; KnOTS' U on the left and, on the
    right, a QR of the subset's Q_i (X_i = coef_i·Q_iᵀ = coef_i·(Q_iᵀ·Q)·Qᵀ)."""
    names, out = list(tasks), {}
    for m, ms in basis.modules.items():
        present = [t for t in names if t in ms.tasks]
        if not present:
            continue
        if basis.space == "core":
            out[m] = (ms.left.to(dtype), ms.right.to(dtype), ms.stack(names, dtype))
            continue
        qs = {t: ms.basis_q[ms.tasks[t]].to(dtype) for t in present}
        Q, _ = torch.linalg.qr(torch.cat(list(qs.values()), dim=1))
        zero = Q.new_zeros(ms.left.shape[1], Q.shape[1])
        cs = [ms.coef[ms.tasks[t]].to(dtype) @ (qs[t].T @ Q) if t in qs else zero for t in names]
        out[m] = (ms.left.to(dtype), Q, torch.stack(cs))
    return out


def core_merge(cores: Cores, spec: MergeSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A spectral method (Iso-C, Iso-CTS, TSV-M, CART) on cores {module: (P, Q, C)}, ΔW_t = P·C_t·Qᵀ.
    As the method commutes with orthonormal changes of frame, P·merged·Qᵀ is its dense definition exactly."""
    _, method = resolve(spec.method)
    if not method.invariant:
        raise MergeError(f"{spec.method!r} is not a spectral merge")
    if not cores:
        return {}
    stacks = [C for _, _, C in cores.values()]
    merged = method.fn(stacks, _weights(spec, stacks[0].dtype, stacks[0].device), **spec.resolved_params())
    return dict(zip(cores, compact_lefts([(P, X, Q) for (P, Q, _), X in zip(cores.values(), merged)])))


def regression_merge(
    factors: dict[str, dict[str, tuple]],
    grams: dict[str, dict],
    spec: MergeSpec,
    dtype: torch.dtype = torch.float32,
    frames: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RegMean (`regmean` = `knots-regmean`; `core-regmean`: rows in the subset's A-span) from factors
    {module: {task: (B_t, A_t)}} and each task's Grams {task: {module: stats.Gram}} (TaskStats.grams), module by
    module. Only the tasks that adapt a module enter its solve. A task without statistics, or whose statistics
    lack a module it adapts, is a MergeError that names it. `frames` {module: V} (core-regmean only): the Grams
    are given projected on V (I×R orthonormal, spanning every A_t: stats.Projected), the solve runs in V's
    coordinates, and the merged A is mapped back (A·Vᵀ) — the same merge, at a cost that follows R, not I."""
    space, method = resolve(spec.method)
    lacking = [t for t in spec.tasks if grams.get(t) is None]
    if lacking:
        raise MergeError(missing_stats(lacking))
    params = spec.resolved_params()
    out = {}
    for m, per_task in factors.items():
        ts = [t for t in spec.tasks if t in per_task]
        if not ts:
            continue
        gs = [grams[t].get(m) for t in ts]
        if None in gs:
            t = ts[gs.index(None)]
            raise MergeError(f"the statistics of task {t!r} have no Gram for module {m!r}: measure them again")
        device = per_task[ts[0]][0].device
        V = frames[m].to(device, dtype) if frames else None
        pairs = [(per_task[t][0].to(dtype), per_task[t][1].to(dtype)) for t in ts]
        if V is not None:
            pairs = [(B, A @ V) for B, A in pairs]
        w = [spec.weights.get(t, 1.0) for t in ts]
        B, A = method.fn(
            pairs,
            [g.to(device) for g in gs],
            w,
            alpha=params["alpha"],
            reduce=params["reduce"],
            restrict=space == "core",
        )
        out[m] = (B, A if V is None else A @ V.T)  # regmean's factors are compact; V has orthonormal columns
    return out


def missing_stats(tasks, how: str = "run `knots-serve stats --config CONFIG --data DIR`") -> str:
    return (
        f"no statistics for task(s) {', '.join(tasks)} measured with their current adapter: the data-aware "
        f"merges (regmean, core-regmean) need each task's input Grams; {how}"
    )


def merge_factors(
    factors: dict[str, dict[str, tuple]],
    spec: MergeSpec,
    dtype: torch.dtype = torch.float32,
    stats: dict | None = None,
    frames: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TA, a spectral merge or RegMean from the tasks' factors (`linear_merge`, `core_merge`,
    `regression_merge`: the last with the tasks' statistics {task: stats.TaskStats}, and their Grams'
    frames when projected), with the options on."""
    method = resolve(spec.method)[1]
    if method.linear:
        lora = linear_merge(factors, spec, dtype)
    elif method.data:
        lora = regression_merge(factors, {t: s.grams for t, s in (stats or {}).items()}, spec, dtype, frames)
    else:
        lora = core_merge(factor_cores(factors, spec.tasks, dtype), spec)
    return finish(lora, spec, lambda: factor_sum_norm2(factors, spec))


def basis_factors(basis: Basis, tasks) -> dict[str, dict[str, tuple]]:
    """{module: {task: (B_t, A_t)}} of the named tasks, from a KnOTS or Core basis."""
    out = {m: {t: ms.task_factors(t) for t in tasks if t in ms.tasks} for m, ms in basis.modules.items()}
    return {m: per_task for m, per_task in out.items() if per_task}


def _norm2(update) -> float:
    """‖ΔW‖_F² of factors (B, A), from their small Gram matrices, or of a dense ΔW; in float64."""
    if isinstance(update, tuple):
        B, A = (t.to(F64) for t in update)
        return float(((B.T @ B) * (A @ A.T)).sum())
    return float(update.to(F64).square().sum())


def factor_sum_norm2(factors: dict[str, dict[str, tuple]], spec: MergeSpec) -> float:
    """‖Σ_t w_t ΔW_t‖_F² summed over modules, from the factors."""
    total = 0.0
    for per_task in factors.values():
        ts = [t for t in spec.tasks if t in per_task]
        if ts:
            B = torch.cat([spec.weights.get(t, 1.0) * per_task[t][0].to(F64) for t in ts], dim=1)
            total += _norm2((B, torch.cat([per_task[t][1].to(F64) for t in ts], dim=0)))
    return total


def _basis_sum_norm2(basis: Basis, spec: MergeSpec, dtype: torch.dtype) -> float:
    """‖Σ_t w_t ΔW_t‖_F² over modules: every space's tensors are coordinates in orthonormal frames."""
    w = _weights(spec, dtype, basis.device)
    total = 0.0
    for ms in basis.modules.values():
        if any(t in ms.tasks for t in spec.tasks):
            total += _norm2((w[:, None, None] * ms.stack(list(spec.tasks), dtype)).sum(0))
    return total


def finish(merged: dict, spec: MergeSpec, sum_norm2) -> dict:
    """The options every method takes, on its merged update per module (factors (B, A) or a dense ΔW):
    isotropize (the nonzero spectrum replaced by its mean), then LiNeS depth scaling (methods/lines.py;
    `sum_norm2()` gives ‖Σ_t w_t ΔW_t‖² for its base scale, computed only when LiNeS is on)."""
    params = spec.resolved_params()
    if params.get("isotropize"):
        merged = {
            m: (isotropic_factors(*v) if v[0].shape[1] else v) if isinstance(v, tuple) else isotropic(v)
            for m, v in merged.items()
        }
    beta = params.get("lines", 0.0)
    if beta:
        base = lines_base(sum_norm2(), sum(_norm2(v) for v in merged.values()), len(spec.tasks))
        scale = lines_scales(merged, beta, base)
        merged = {m: (scale[m] * v[0], v[1]) if isinstance(v, tuple) else scale[m] * v for m, v in merged.items()}
    return merged


def to_host(lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors on another device -> on the CPU in one copy (one flat buffer, not a transfer per tensor)."""
    tensors = [t for pair in lora.values() for t in pair]
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return lora
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    views = iter(flat.split([t.numel() for t in tensors]))
    return {m: (next(views).view(B.shape), next(views).view(A.shape)) for m, (B, A) in lora.items()}


def merge_dense(
    basis: Basis, spec: MergeSpec, progress: bool = False, dtype: torch.dtype = torch.float32, stats: dict | None = None
) -> dict[str, torch.Tensor]:
    """The merge as dense float64 ΔW per module (for writing a merged full model)."""
    _, method = resolve(spec.method)
    if factored(method) and basis.space != "full":
        lora = merge_lora(basis, spec, None, progress, dtype, stats)
        return {m: B.to(F64) @ A.to(F64) for m, (B, A) in lora.items()}
    merged = merged_tensors(basis, spec, progress, dtype)
    dense = {m: basis.modules[m].to_dense(X) for m, X in merged.items()}
    return finish(dense, spec, lambda: _basis_sum_norm2(basis, spec, dtype))
