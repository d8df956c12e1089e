"""Aligned spaces for merging: the KnOTS joint SVD, the Core Space basis, and plain dense updates.

Per module, task i contributes ΔW_i = s_i·B_i·A_i. A *space* turns those into per-task tensors X_i
that merge methods combine elementwise, and turns the merged tensor back into LoRA factors (B, A):

- ``knots``: SVD of M = [ΔW_1 | … | ΔW_n] = U·diag(σ)·[Vh_1 | … | Vh_n]; X_i = diag(σ)·Vh_i (k×I),
  ΔW = U·X. Computed exactly from the factors: M = [B_1..B_n]·blockdiag(s_i·A_i) has rank ≤ Σr_i,
  so a QR of the stacked B's, a QR of each A_iᵀ and an SVD of the small (Σr)×(Σr) core give U, σ, Vh
  without ever forming M (docs/ARCHITECTURE.md). X_i is kept factored, X_i = coef_i·Q_iᵀ (coef_i: k×r_i,
  Q_i: I×r_i orthonormal), so memory grows with Σr_i·(k+I), not n·k·I.
- ``core`` (Core Space, Panariello et al. 2025): U_B, V_A the left singular vectors of the stacked B's
  and of the stacked Aᵀ's;
  X_i = U_Bᵀ·ΔW_i·V_A (Σr×Σr), ΔW = U_B·X·V_Aᵀ. Lossless.
- ``full``: X_i = ΔW_i dense (the classic baselines); the merged ΔW is refactored by an SVD.

A basis is built in float64 (the matrices are thin, so it is cheap) and stored in float32; merges run in
float32 on whatever device the basis sits on (`Basis.to`), float64 only where a test asks for it.
Re-factoring a merged X never repeats the basis work: U (and V_A) are orthonormal, so only X itself is
factored (`compact_left`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import AdapterError, LoraAdapter, check_compatible
from .atomic import atomic_write_file

SPACES = ("full", "knots", "core")
DEFAULT_RTOL = 1e-7  # singular values below rtol·σ_max are numerical zeros of an exact low-rank product
F64 = torch.float64


def rtol_for(dtype: torch.dtype) -> float:
    """Numerical-zero cutoff for factorizations computed in `dtype` (float32 noise is ~1e-7·σ_max·√k)."""
    return DEFAULT_RTOL if dtype == F64 else 1e-5


def joint_svd(
    Bs: list[torch.Tensor],
    As: list[torch.Tensor],
    scales: list[float],
    rtol: float | None = None,
    dtype: torch.dtype = F64,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Thin SVD of [s_1·B_1·A_1 | … | s_n·B_n·A_n] from the factors, computed in `dtype` on their device.

    Returns U (O×k), σ (k), and per task (coef_i, Q_i) with diag(σ)·Vh_i = coef_i·Q_iᵀ.
    Only σ > rtol·σ_max are kept (default: `rtol_for(dtype)`).
    """
    rtol = rtol_for(dtype) if rtol is None else rtol
    Qb, Rb = torch.linalg.qr(torch.cat([B.to(dtype) for B in Bs], dim=1))
    Qas, cores = [], []
    # M = Qb · core · blockdiag(Qa_i)^T, core = Rb · blockdiag(s_i·Ra_i^T) formed a task's columns at a time:
    # never the (Σr)² block-diagonal matrix, so a pool's build grows linearly with its total rank
    for Rb_i, A, s in zip(torch.split(Rb, [B.shape[1] for B in Bs], dim=1), As, scales):
        Qa, Ra = torch.linalg.qr(A.to(dtype).T)  # A = Ra^T Qa^T
        Qas.append(Qa)
        cores.append(Rb_i @ (s * Ra.T))
    core = torch.cat(cores, dim=1)
    Uc, sigma, Vhc = torch.linalg.svd(core, full_matrices=False)
    keep = sigma > rtol * sigma[0] if sigma.numel() and sigma[0] > 0 else torch.zeros_like(sigma, dtype=bool)
    Uc, sigma, Vhc = Uc[:, keep], sigma[keep], Vhc[keep]
    U = Qb @ Uc
    sVh = sigma[:, None] * Vhc
    coefs = list(torch.split(sVh, [Qa.shape[1] for Qa in Qas], dim=1))
    return U, sigma, coefs, Qas


def compact(B: torch.Tensor, A: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest exact factorization of B·A (up to rtol), computed in B's dtype: (U, diag(σ)·Vh)."""
    U, _, (coef,), (Q,) = joint_svd([B], [A], [1.0], rtol, dtype=B.dtype)
    return U, coef @ Q.T


def compact_left(
    U: torch.Tensor, X: torch.Tensor, V: torch.Tensor | None = None, rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """compact(U·X·Vᵀ) for U (and V) with orthonormal columns, without touching U's rows: only X is
    factored, through its small Gram matrix (in float64). A merged X of full row rank (the usual case: TIES
    keeps entries everywhere) is already minimal and kept as is; a rank-deficient one is cut to the
    eigenvectors W of its Gram above (rtol·σ_max)²: X = W·(Wᵀ·X). An eigendecomposition, not an SVD of X:
    LAPACK's SVD can fail to converge on the many equal singular values an isotropic merge has (Iso-C)."""
    rtol = rtol_for(X.dtype) if rtol is None else rtol
    X64 = X.to(F64)
    tall = X.shape[0] > X.shape[1]
    eig, vec = torch.linalg.eigh(X64.T @ X64 if tall else X64 @ X64.T)  # ascending
    if not tall and eig.numel() and eig[0] > (rtol * 10) ** 2 * eig[-1]:  # σ_min > 10·rtol·σ_max: full rank
        return U, X if V is None else X @ V.T
    keep = eig > rtol**2 * eig[-1] if eig.numel() and eig[-1] > 0 else torch.zeros_like(eig, dtype=torch.bool)
    W = vec[:, keep].to(X.dtype)
    B, A = (U @ (X @ W), W.T) if tall else (U @ W, W.T @ X)  # X = (X·W)·Wᵀ, or W·(Wᵀ·X)
    return B, A if V is None else A @ V.T


@dataclass
class ModuleSpace:
    """One module's tasks in one space. `tensors(idx)` gives the stack X (n × …) for tasks idx;
    `to_lora(X)` turns a merged X back into exact LoRA factors (B, A) with ΔW = B·A."""

    space: str
    shape: tuple[int, int]  # (O, I) of the module
    tasks: dict[str, int]  # task name -> slot in the per-task lists (tasks without this module are absent)
    left: torch.Tensor | None  # knots: U (O×k); core: U_B (O×R); full: None
    right: torch.Tensor | None  # core: V_A (I×R); else None
    coef: list[torch.Tensor]  # knots: coef_i (k×r_i); core: X_i (R×R); full: ΔW_i (O×I)
    basis_q: list[torch.Tensor]  # knots: Q_i (I×r_i); else empty

    def __post_init__(self):
        # one memory layout whether built (LAPACK returns column-major) or loaded, so results are bitwise equal
        def c(t):
            return None if t is None else t.contiguous()

        self.left, self.right = c(self.left), c(self.right)
        self.coef, self.basis_q = [c(t) for t in self.coef], [c(t) for t in self.basis_q]

    def task_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """X for one task (in `dtype`, default the stored float32); zeros for a task without this module."""
        like = self.left if self.left is not None else self.coef[0]
        dtype = dtype or like.dtype
        if name not in self.tasks:
            return torch.zeros(self.tensor_shape, dtype=dtype, device=like.device)
        i = self.tasks[name]
        if self.space == "knots":
            return self.coef[i].to(dtype) @ self.basis_q[i].to(dtype).T
        return self.coef[i].to(dtype)

    def task_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW_i as two factors of rank r_i (knots: U·coef_i, Q_iᵀ) or of the basis rank (core: U_B·X_i, V_Aᵀ);
        None for a task without this module. A dense-space basis keeps no factors (ValueError)."""
        if name not in self.tasks:
            return None
        i = self.tasks[name]
        if self.space == "knots":
            return self.left @ self.coef[i], self.basis_q[i].T
        if self.space == "core":
            return self.left @ self.coef[i], self.right.T
        raise ValueError("a dense-space basis keeps no factors")

    @property
    def tensor_shape(self) -> tuple[int, int]:
        if self.space == "knots":
            return (self.left.shape[1], self.shape[1])
        return tuple(self.coef[0].shape) if self.coef else (0, 0)

    def stack(self, names: list[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.stack([self.task_tensor(n, dtype) for n in names])

    def to(self, device: torch.device | str) -> ModuleSpace:
        def move(t):
            return None if t is None else t.to(device)

        return ModuleSpace(
            self.space,
            self.shape,
            self.tasks,
            move(self.left),
            move(self.right),
            [move(t) for t in self.coef],
            [move(t) for t in self.basis_q],
        )

    def to_dense(self, X: torch.Tensor) -> torch.Tensor:
        """The merged ΔW (O×I, float64) for a merged X."""
        X = X.to(F64)
        if self.space == "knots":
            return self.left.to(F64) @ X
        if self.space == "core":
            return self.left.to(F64) @ X @ self.right.to(F64).T
        return X

    def to_lora(
        self, X: torch.Tensor, max_rank: int | None, rtol: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact, minimal LoRA factors (B, A) of the merged ΔW, in X's dtype and on its device."""
        if self.space == "knots":
            return compact_left(self.left.to(X.dtype), X, rtol=rtol)
        if self.space == "core":
            return compact_left(self.left.to(X.dtype), X, self.right.to(X.dtype), rtol=rtol)
        # full: a dense merge (TIES trims entries) is in general full-rank; keep the top max_rank.
        rtol = rtol_for(X.dtype) if rtol is None else rtol
        U, s, Vh = torch.linalg.svd(X, full_matrices=False)
        keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        keep = keep if max_rank is None else min(keep, max_rank)
        return U[:, :keep] * s[:keep], Vh[:keep]


@dataclass
class Basis:
    """A pool's tasks in one space, module by module; built once, saved, and reused for every subset."""

    space: str
    tasks: list[str]
    modules: dict[str, ModuleSpace]
    base_model: str | None = None
    fingerprint: str = ""

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        index = {}
        for m, ms in self.modules.items():
            index[m] = {"shape": list(ms.shape), "tasks": ms.tasks}
            for label, t in (("left", ms.left), ("right", ms.right)):
                if t is not None:
                    tensors[f"{m}.{label}"] = t.contiguous()
            for i, t in enumerate(ms.coef):
                tensors[f"{m}.coef.{i}"] = t.contiguous()
            for i, t in enumerate(ms.basis_q):
                tensors[f"{m}.q.{i}"] = t.contiguous()
        meta = {
            "space": self.space,
            "tasks": self.tasks,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "modules": index,
        }
        atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"knots_serve_basis": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Basis:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["knots_serve_basis"])
            keys = set(f.keys())

            # clone: a tensor read from the file may sit at an unaligned offset, which sends BLAS down
            # another path; cloned, a loaded basis merges bitwise like the one that was saved.
            def get(k):
                return f.get_tensor(k).clone() if k in keys else None

            modules = {}
            for m, info in meta["modules"].items():
                n = len(info["tasks"])
                modules[m] = ModuleSpace(
                    space=meta["space"],
                    shape=tuple(info["shape"]),
                    tasks=info["tasks"],
                    left=get(f"{m}.left"),
                    right=get(f"{m}.right"),
                    coef=[get(f"{m}.coef.{i}") for i in range(n)],
                    basis_q=[get(f"{m}.q.{i}") for i in range(n) if f"{m}.q.{i}" in keys],
                )
        return cls(meta["space"], meta["tasks"], modules, meta["base_model"], meta["fingerprint"])

    def to(self, device: torch.device | str) -> Basis:
        """The same basis with every tensor on `device` (a copy; self is unchanged)."""
        modules = {m: ms.to(device) for m, ms in self.modules.items()}
        return Basis(self.space, self.tasks, modules, self.base_model, self.fingerprint)

    @property
    def device(self) -> torch.device:
        ms = next(iter(self.modules.values()), None)
        t = None if ms is None else (ms.left if ms.left is not None else (ms.coef or [None])[0])
        return torch.device("cpu") if t is None else t.device

    def nbytes(self) -> int:
        ts = [t for ms in self.modules.values() for t in (ms.left, ms.right, *ms.coef, *ms.basis_q) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def fingerprint(adapters: list[LoraAdapter], space: str, rtol: float) -> str:
    """Identifies a basis by what it was built from, so a saved basis is reused only for the same pool."""
    h = hashlib.sha256(json.dumps([space, rtol]).encode())
    for a in adapters:
        h.update(a.name.encode())
        h.update(a.digest.encode())  # its factors' hash, computed once per adapter
    return h.hexdigest()[:16]


def column_range(M: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis of M's column space: left singular vectors with σ > rtol·σ_max. (An SVD, not a
    QR: zero or repeated directions, e.g. a rank-padded adapter, must not add basis vectors.)"""
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    return U[:, s > rtol * s[0]] if s.numel() and s[0] > 0 else U[:, :0]


def _module_space(
    space: str, names: list[str], loras, rtol: float, device=None, dtype=F64, store=torch.float32
) -> ModuleSpace:
    shape = loras[0].shape
    tasks = {n: i for i, n in enumerate(names)}
    Bs, As, scales = [l.B.to(device) for l in loras], [l.A.to(device) for l in loras], [l.scale for l in loras]
    if space == "knots":
        U, _, coefs, qs = joint_svd(Bs, As, scales, max(rtol, rtol_for(dtype)), dtype)
        return ModuleSpace(
            space, shape, tasks, U.to(store), None, [c.to(store) for c in coefs], [q.to(store) for q in qs]
        )
    if space == "core":
        Ub = column_range(torch.cat([B.to(F64) for B in Bs], dim=1), rtol)
        Va = column_range(torch.cat([A.to(F64) for A in As], dim=0).T, rtol)
        cores = [s * (Ub.T @ B.to(F64)) @ (A.to(F64) @ Va) for B, A, s in zip(Bs, As, scales)]
        return ModuleSpace(space, shape, tasks, Ub.to(store), Va.to(store), [c.to(store) for c in cores], [])
    if space == "full":
        return ModuleSpace(
            space,
            shape,
            tasks,
            None,
            None,
            [s * (B.to(F64) @ A.to(F64)).to(store) for B, A, s in zip(Bs, As, scales)],
            [],
        )
    raise AdapterError(f"unknown merge space {space!r}; choose one of {', '.join(SPACES)}")


def build_basis(
    adapters: list[LoraAdapter],
    space: str = "knots",
    rtol: float = DEFAULT_RTOL,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = F64,
    fingerprint_as: str | None = None,
    store: torch.dtype = torch.float32,
) -> Basis:
    """Build every module's space over all adapters (a task without a module contributes nothing there),
    on `device` (default: where the adapters are), where the basis stays, stored in float32. The KnOTS
    factorizations run in `dtype` (float64 for a pool's basis; float32 is enough for a per-request subset
    basis). `fingerprint_as` names the basis instead of hashing every factor (for bases made per request).
    `store` is the dtype it is kept in (float64 only where a test checks a compute path to round-off)."""
    check_compatible(adapters)
    module_names = sorted({m for a in adapters for m in a.modules})
    if progress:
        from tqdm.auto import tqdm

        module_names = tqdm(module_names, desc=f"{space} basis", unit="module")
    modules = {}
    for m in module_names:
        have = [a for a in adapters if m in a.modules]
        loras = [a.modules[m] for a in have]
        modules[m] = _module_space(space, [a.name for a in have], loras, rtol, device, dtype, store)
    base = next((a.base_model for a in adapters if a.base_model), None)
    return Basis(space, [a.name for a in adapters], modules, base, fingerprint_as or fingerprint(adapters, space, rtol))


def lora_ranks(adapters: dict[str, LoraAdapter]) -> dict[str, int]:
    return {n: sum(lora.rank for lora in a.modules.values()) for n, a in adapters.items()}


def auto_basis(tasks, ranks: dict[str, int]) -> str:
    """`basis: auto`: "subset" when the tasks' summed LoRA ranks are at most half the pool's, else "shared".
    ranks: every pool task -> the sum of its LoRA ranks over modules."""
    return "subset" if 2 * sum(ranks[t] for t in tasks) <= sum(ranks.values()) else "shared"
