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
from .kernels import column_shares, row_sq_norms

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
    b_frames = [tuple(t[None] for t in torch.linalg.qr(B.to(dtype))) for B in Bs]
    a_frames = [tuple(t[None] for t in torch.linalg.qr(A.to(dtype).T)) for A in As]  # A = Ra^T Qa^T
    (out,) = joint_svds(b_frames, a_frames, [torch.tensor([s], dtype=F64) for s in scales], rtol, dtype)
    return out


def joint_svds(
    b_frames: list[tuple[torch.Tensor, torch.Tensor]],
    a_frames: list[tuple[torch.Tensor, torch.Tensor]],
    scales: list[torch.Tensor],
    rtol: float | None = None,
    dtype: torch.dtype = F64,
) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
    """`joint_svd` of b modules of one shape at once, from each task's QRs (`frames`): B_i = Qb_i·Rb_i
    (b×O×r_i, b×r_i×r_i) and A_iᵀ = Qa_i·Ra_i (b×I×r_i, b×r_i×r_i), and scales[i] (b); one batched product
    and SVD per step instead of one per module (a per-module loop pays Python and LAPACK-call overhead 100+
    times a merge). Each module's result is cut to its own numerical rank."""
    rtol = rtol_for(dtype) if rtol is None else rtol
    Q, R = joint_frame([(Qb.to(dtype), Rb.to(dtype)) for Qb, Rb in b_frames])
    # M = Q · core · blockdiag(Qa_i)^T, core = R · blockdiag(s_i·Ra_i^T) formed a task's columns at a time:
    # never the (Σr)² block-diagonal matrix, so a pool's build grows linearly with its total rank
    cores = [
        R_i @ (s.to(R.device, dtype)[:, None, None] * Ra.to(dtype).mT)
        for R_i, (_, Ra), s in zip(R.split([Rb.shape[-1] for _, Rb in b_frames], dim=-1), a_frames, scales)
    ]
    Uc, sigma, Vhc = torch.linalg.svd(torch.cat(cores, dim=-1), full_matrices=False)
    U, sVh = Q @ Uc, sigma[..., None] * Vhc
    top = sigma[:, :1] if sigma.shape[-1] else sigma.new_zeros(sigma.shape[0], 1)
    ks = ((sigma > rtol * top) & (top > 0)).sum(-1).tolist()  # σ descends: each module keeps a prefix
    # each task's coefficients made contiguous for the whole batch at once: a module's are then a row prefix
    # of its slice, not a copy per module (240 small copies of a 2-task demo merge)
    coefs = [c.contiguous() for c in sVh.split([Qa.shape[-1] for Qa, _ in a_frames], dim=-1)]
    return [
        (U[j, :, :k], sigma[j, :k], [c[j, :k] for c in coefs], [Qa[j].to(dtype) for Qa, _ in a_frames])
        for j, k in enumerate(ks)
    ]


def joint_frame(frames: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (b×O×K, orthonormal columns) and R (b×K×Σr) with [B_1 | … | B_n] = Q·R, from each block's own QR
    B_i = Q_i·R_i. Block Gram-Schmidt, the projection done twice ("twice is enough": orthogonal to working
    precision): each block costs products and a QR of its own width, half the flops of a QR of the whole
    stack, and each task's QR is computed once, not per subset. Where the blocks' total width exceeds O,
    the stack itself is factored (its columns cannot all be new directions)."""
    widths = [R.shape[-1] for _, R in frames]
    if sum(widths) > frames[0][0].shape[-2]:
        return torch.linalg.qr(torch.cat([Q @ R for Q, R in frames], dim=-1))
    Q, R = frames[0]
    for Qi, Ri in frames[1:]:
        C = Q.mT @ Qi
        W = Qi - Q @ C
        C2 = Q.mT @ W
        Qw, Rw = torch.linalg.qr(W - Q @ C2)  # Qi = Q·(C + C2) + Qw·Rw
        top = torch.cat([R, (C + C2) @ Ri], dim=-1)
        bottom = torch.cat([R.new_zeros(R.shape[0], Rw.shape[-2], R.shape[-1]), Rw @ Ri], dim=-1)
        Q, R = torch.cat([Q, Qw], dim=-1), torch.cat([top, bottom], dim=-2)
    return Q, R


def lora_frames(loras: list, side: str, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The QR of every LoraModule's B (side "B": B = Qb·Rb) or Aᵀ (side "A": Aᵀ = Qa·Ra), stacked
    (b×O×r or b×I×r, and b×r×r), from one batched QR. Kept on each module when computed in its own dtype and
    place (a per-request subset basis: a task's half of the joint SVD is the same in every subset it enters,
    so it is factored once per task, not once per merge)."""
    home = loras[0].A.device
    keep = dtype == loras[0].A.dtype and (device is None or torch.device(device) == home)
    if keep and all((side, dtype) in lora.frames for lora in loras):
        return tuple(restack(parts) for parts in zip(*(lora.frames[side, dtype] for lora in loras)))
    M = torch.stack([lora.B if side == "B" else lora.A for lora in loras]).to(device, dtype)
    # row-major, as a stack of the kept frames is: products of either give the same bits
    Q, R = (t.contiguous() for t in torch.linalg.qr(M if side == "B" else M.mT))
    if keep:
        for lora, q, r in zip(loras, Q, R):
            lora.frames[side, dtype] = (q, r)
    return Q, R


def restack(tensors) -> torch.Tensor:
    """torch.stack(tensors), without the copy when they are equally spaced, same-shaped views of one tensor
    (in order): then they are one strided view of it. `lora_frames` keeps a group's frames as slices of its
    batch and the same group asks for them again at every merge (at 8B shapes the copies were a tenth of a
    2-task merge); a merge hands `compact_lefts` its modules as consecutive pieces of one buffer."""
    first, base = tensors[0], tensors[0]._base
    step = tensors[1].storage_offset() - first.storage_offset() if len(tensors) > 1 else first.numel()
    if (
        base is not None
        and step >= first.numel()
        and all(
            t._base is base
            and t.shape == first.shape
            and t.stride() == first.stride()
            and t.storage_offset() == first.storage_offset() + j * step
            for j, t in enumerate(tensors)
        )
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def compact(B: torch.Tensor, A: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest exact factorization of B·A (up to rtol), computed in B's dtype: (U, diag(σ)·Vh)."""
    return compacts({None: (B, A)}, rtol)[None]


def compacts(pairs: dict, rtol: float | None = None) -> dict:
    """`compact` of every {key: (B, A)}, as one joint SVD batch per shape (and dtype)."""
    groups: dict[tuple, list] = {}
    for key, (B, A) in pairs.items():
        groups.setdefault((B.shape, A.shape, B.dtype), []).append(key)
    out = {}
    for (_, _, dtype), keys in groups.items():
        b_frame = torch.linalg.qr(torch.stack([pairs[k][0] for k in keys]))
        a_frame = torch.linalg.qr(torch.stack([pairs[k][1] for k in keys]).to(dtype).mT)
        ones = torch.ones(len(keys), dtype=F64)
        for k, (U, _, (coef,), (Q,)) in zip(keys, joint_svds([b_frame], [a_frame], [ones], rtol, dtype)):
            out[k] = (U, coef @ Q.T)
    return {k: out[k] for k in pairs}


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


def compact_lefts(
    items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], rtol: float | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`compact_left(U, X, V)` of many modules. The usual merged X is of full row rank once the rows a
    trim emptied are dropped (exact: U·X = U[:, kept]·X[kept]); that is certified for each batch of one X
    shape by one batched Cholesky of Grams in float64 instead of an eigendecomposition per module. Rows far
    wider than tall (8B shapes, where the whole Grams cost more than the merge) are first certified from a
    few of their columns: X·P for a column selection P has σ_min(X·P) ≤ σ_min(X), so a selection that passes
    certifies X. The columns taken are those that hold the largest shares of the rows' energy, so a sparse
    row's few entries are among them (a random selection missed them in 2 of 3 of the demo's TIES merges).
    A module the selection does not certify is certified from its whole rows; one that fails that too goes
    through `compact_left`."""
    out: list = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (_, X, _) in enumerate(items):
        if 0 < X.shape[0] <= X.shape[1]:
            groups.setdefault((tuple(X.shape), X.dtype), []).append(i)
    for ((rows, cols), dtype), idx in groups.items():
        cut = rtol_for(dtype) if rtol is None else rtol
        X = restack([items[i][1] for i in idx])  # b × rows × cols
        norms = row_sq_norms(X)  # b × rows, float64
        empty, trace = norms == 0, norms.sum(-1)  # trace ≥ λ_max
        full = torch.zeros(len(idx), dtype=torch.bool, device=norms.device)
        if cols >= SELECT_ABOVE * rows:
            picks = column_shares(X, norms).topk(SELECTED * rows, dim=-1, sorted=False).indices
            full = _certified(X.gather(-1, picks[:, None].expand(-1, rows, -1)), empty, trace, cut)
        rest = (~full).nonzero().flatten()
        if rest.numel():
            full[rest] = _certified(X[rest], empty[rest], trace[rest], cut)
        kept = ~empty
        whole = kept.all(-1).tolist()
        rows_of = kept.nonzero()[:, 1].split(kept.sum(-1).tolist())  # each module's kept rows, from one call
        for j in full.nonzero().flatten().tolist():
            U, Xj, V = items[idx[j]]
            B, A = (U, Xj) if whole[j] else (U.index_select(1, rows_of[j]), Xj.index_select(0, rows_of[j]))
            out[idx[j]] = (B, A if V is None else A @ V.T)
    return [pair if pair is not None else compact_left(*items[i], rtol=rtol) for i, pair in enumerate(out)]


SELECT_ABOVE, SELECTED = 8, 4  # rows ≥ 8× wider than tall are first certified from 4× as many columns as rows


def _certified(X: torch.Tensor, empty: torch.Tensor, trace: torch.Tensor, cut: float) -> torch.Tensor:
    """Per matrix of X (b × rows × m): whether the rows not `empty` have σ_min > 10·cut·σ_max, compact_left's
    full-rank rule, from the Cholesky of their Gram in float64: λ_min ≥ 1/‖L⁻¹‖_F², and `trace` ≥ λ_max."""
    X = X.to(F64)
    G = X @ X.mT
    # an emptied row gets the eigenvalue trace ≥ λ_max instead of 0, so it cannot fail the certificate
    L, info = torch.linalg.cholesky_ex(G + torch.diag_embed(empty * trace[:, None]))
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=F64, device=L.device), upper=False)
    return (info == 0) & (trace > 0) & (Linv.square().sum((-2, -1)).reciprocal() > (10 * cut) ** 2 * trace)


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

    def factored(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(U, X, V) with the merged ΔW = U·X·Vᵀ (knots: V = None), U and V in X's dtype: for compact_lefts."""
        right = None if self.right is None else self.right.to(X.dtype)
        return self.left.to(X.dtype), X, right

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
        if self.space != "full":
            return compact_lefts([self.factored(X)], rtol)[0]
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

    def to_lora(
        self, merged: dict[str, torch.Tensor], max_rank: int | None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`ModuleSpace.to_lora` of every merged X {module: X}, compacted as batches (compact_lefts)."""
        if self.space == "full":
            return {m: self.modules[m].to_lora(X, max_rank) for m, X in merged.items()}
        return dict(zip(merged, compact_lefts([self.modules[m].factored(X) for m, X in merged.items()])))

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
    return column_ranges(M[None], rtol)[0]


def column_ranges(M: torch.Tensor, rtol: float) -> list[torch.Tensor]:
    """`column_range` of each matrix of a batch (b × p × q), from one batched SVD."""
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    top = s[:, :1] if s.shape[-1] else s.new_zeros(s.shape[0], 1)
    return [U[j, :, :k] for j, k in enumerate(((s > rtol * top) & (top > 0)).sum(-1).tolist())]


BATCH_BYTES = 256 << 20  # a batch's float64 working set at most (a pool of many tasks at Llama shapes: chunks)


def batch_chunks(items: list, per_item_bytes: int) -> list[list]:
    """`items` cut into consecutive batches of at most BATCH_BYTES working set (one item at least)."""
    size = max(1, BATCH_BYTES // max(per_item_bytes, 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _working_set(space: str, have: tuple) -> int:
    """Bytes of one module's float64 working set in `_module_spaces` (have: (task, B shape, A shape) each)."""
    (out, _), (_, inp) = have[0][1], have[0][2]
    total_rank = sum(b[1] for _, b, _ in have)
    return 8 * (len(have) * out * inp if space == "full" else 4 * (out + inp) * total_rank)


def _module_spaces(
    space: str, names: list[str], per_module: list[list], rtol: float, device=None, dtype=F64, store=torch.float32
) -> list[ModuleSpace]:
    """The spaces of modules adapted by the same tasks with the same shapes (per_module: each module's
    LoraModules, in `names` order), computed as one batch."""
    shape, tasks = per_module[0][0].shape, {n: i for i, n in enumerate(names)}

    def stacked(get):  # per task: its factor of every module, stacked (b × …)
        return [torch.stack([get(loras[i]) for loras in per_module]).to(device) for i in range(len(names))]

    scales = [torch.tensor([loras[i].scale for loras in per_module], dtype=F64) for i in range(len(names))]
    if space == "knots":
        frames = [
            [lora_frames([loras[i] for loras in per_module], side, dtype, device) for side in "BA"]
            for i in range(len(names))
        ]
        return [
            ModuleSpace(space, shape, tasks, U.to(store), None, [c.to(store) for c in coefs], [q.to(store) for q in qs])
            for U, _, coefs, qs in joint_svds(*zip(*frames), scales, max(rtol, rtol_for(dtype)), dtype)
        ]
    Bs, As = stacked(lambda lora: lora.B), stacked(lambda lora: lora.A)
    if space == "core":
        Ubs = column_ranges(torch.cat([B.to(F64) for B in Bs], dim=-1), rtol)
        Vas = column_ranges(torch.cat([A.to(F64) for A in As], dim=-2).mT, rtol)
        out = []
        for j, (Ub, Va) in enumerate(zip(Ubs, Vas)):
            cores = [float(s[j]) * (Ub.T @ B[j].to(F64)) @ (A[j].to(F64) @ Va) for B, A, s in zip(Bs, As, scales)]
            out.append(ModuleSpace(space, shape, tasks, Ub.to(store), Va.to(store), [c.to(store) for c in cores], []))
        return out
    if space == "full":
        deltas = [s.to(F64)[:, None, None] * (B.to(F64) @ A.to(F64)) for B, A, s in zip(Bs, As, scales)]
        return [
            ModuleSpace(space, shape, tasks, None, None, [d[j].to(store) for d in deltas], [])
            for j in range(len(per_module))
        ]
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
    if space not in SPACES:
        raise AdapterError(f"unknown merge space {space!r}; choose one of {', '.join(SPACES)}")
    # modules adapted by the same tasks with the same factor shapes (q of every layer, …) form one batch
    groups: dict[tuple, list[str]] = {}
    for m in sorted({m for a in adapters for m in a.modules}):
        have = tuple((a.name, a.modules[m].B.shape, a.modules[m].A.shape) for a in adapters if m in a.modules)
        groups.setdefault(have, []).append(m)
    batches = groups.items()
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{space} basis", unit="batch")
    modules = {}
    by_name = {a.name: a for a in adapters}
    for have, ms in batches:
        names = [n for n, _, _ in have]
        for chunk in batch_chunks(ms, _working_set(space, have)):
            per_module = [[by_name[n].modules[m] for n in names] for m in chunk]
            modules.update(zip(chunk, _module_spaces(space, names, per_module, rtol, device, dtype, store)))
    modules = dict(sorted(modules.items()))
    base = next((a.base_model for a in adapters if a.base_model), None)
    return Basis(space, [a.name for a in adapters], modules, base, fingerprint_as or fingerprint(adapters, space, rtol))


def lora_ranks(adapters: dict[str, LoraAdapter]) -> dict[str, int]:
    return {n: sum(lora.rank for lora in a.modules.values()) for n, a in adapters.items()}


def auto_basis(tasks, ranks: dict[str, int]) -> str:
    """`basis: auto`: "subset" when the tasks' summed LoRA ranks are at most half the pool's, else "shared".
    ranks: every pool task -> the sum of its LoRA ranks over modules."""
    return "subset" if 2 * sum(ranks[t] for t in tasks) <= sum(ranks.values()) else "shared"
