"""Task statistics for the data-aware merges: per adapted module, the mean Gram matrix of the module's input.

For task t and a linear module with input x (I features), G_t = (1/N_t)·Σ x·xᵀ over the N_t tokens of task
t's examples run through task t's own adapted model (base + its LoRA: stats_run.py measures it). A mean, not
a sum, so a task with longer prompts does not outweigh the others. RegMean (methods/regression.py) reads
G_t; nothing else of the data is kept.

The file (one per task, safetensors; the contract any producer may write):
- `<module>.gram`: I×I float32, symmetric PSD (the module key as in the adapter minus `.lora_A/.lora_B`,
  e.g. `base_model.model.model.layers.0.self_attn.q_proj`) — always accepted; or, compressed for large I,
  `<module>.gram_lowrank` (I×s) and `<module>.gram_diag` (I): G ≈ L·Lᵀ + diag(d), the top s eigenpairs
  with the diagonal kept exact (`sketch`).
- `__metadata__`: `tokens` (N), `examples`, `task`, `adapter` (the adapter's digest), `data` (the data's
  digest), and `same_input` (JSON {module: module whose Gram it shares}: q/k/v read one input, gate/up
  another; stored once). A merge uses a task's statistics only if `adapter` is the digest of the adapter it
  merges: statistics of another version of the adapter are never merged (`StatsDir.find`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write_file

PREFIX = "base_model.model."  # the file names modules as the adapter's tensors do; in memory, as LoraAdapter


class StatsError(ValueError):
    """A statistics file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Gram:
    """One module's input Gram: dense (I×I), or low-rank plus diagonal (L: I×s, d: I; G ≈ L·Lᵀ + diag(d))."""

    dense: torch.Tensor | None = None
    low: torch.Tensor | None = None
    diag_rest: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return (self.dense if self.dense is not None else self.low).shape[0]

    def diagonal(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.diagonal()
        return self.low.square().sum(1) + self.diag_rest

    def reduced(self, reduce: float, dtype: torch.dtype) -> torch.Tensor:
        """G̃ = reduce·G + (1 − reduce)·diag(G), dense (I×I), in `dtype` (RegMean's off-diagonal shrinkage)."""
        if self.dense is not None:
            G = self.dense.to(dtype)
        else:
            L = self.low.to(dtype)
            G = L @ L.T + torch.diag(self.diag_rest.to(dtype))
        return reduce * G + (1 - reduce) * torch.diag(G.diagonal())

    def reduced_times(self, X: torch.Tensor, reduce: float) -> torch.Tensor:
        """G̃·X (X: I×c) without forming G̃ when the Gram is low-rank: a·L·(Lᵀ·X) + (d + (1−a)·rowsq(L))⊙X."""
        if self.dense is not None:  # without the reduced copy of G: a·(G·X) + (1 − a)·diag(G)⊙X
            G = self.dense.to(X.dtype)
            return reduce * (G @ X) + (1 - reduce) * G.diagonal()[:, None] * X
        L, d = self.low.to(X.dtype), self.diag_rest.to(X.dtype)
        return reduce * (L @ (L.T @ X)) + (d + (1 - reduce) * L.square().sum(1))[:, None] * X

    def to(self, device) -> Gram:
        return Gram(*(None if t is None else t.to(device) for t in (self.dense, self.low, self.diag_rest)))

    def project(self, V: torch.Tensor) -> Projected:
        """This Gram seen in the frame V (I×R orthonormal): Vᵀ·G·V and Vᵀ·diag(G)·V (R×R each), which is all a
        solve with rows in span(V) needs of it (core-regmean on the pool's A-span)."""
        V = V.to(self.diag_rest.dtype if self.dense is None else self.dense.dtype)
        if self.dense is not None:
            full = V.T @ (self.dense @ V)
        else:
            LV = self.low.T @ V
            full = LV.T @ LV + (V * self.diag_rest[:, None]).T @ V
        return Projected(full, (V * self.diagonal()[:, None]).T @ V)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.low, self.diag_rest) if t is not None)


@dataclass(frozen=True)
class Projected:
    """A Gram in a frame V (Gram.project): G̃ = reduce·full + (1 − reduce)·diag, both R×R."""

    full: torch.Tensor
    diag: torch.Tensor

    def reduced_times(self, X: torch.Tensor, reduce: float) -> torch.Tensor:
        return (reduce * self.full.to(X.dtype) + (1 - reduce) * self.diag.to(X.dtype)) @ X

    def to(self, device) -> Projected:
        return Projected(self.full.to(device), self.diag.to(device))

    def nbytes(self) -> int:
        return 2 * self.full.numel() * self.full.element_size()


def sketch(G: torch.Tensor, rank: int) -> Gram:
    """The top `rank` eigenpairs of a dense Gram plus its exact diagonal: G ≈ L·Lᵀ + diag(diag(G) − rowsq(L))."""
    if rank >= G.shape[0]:
        return Gram(dense=G)
    vals, vecs = torch.linalg.eigh(G.double())
    L = vecs[:, -rank:] * vals[-rank:].clamp(min=0).sqrt()
    rest = G.double().diagonal() - L.square().sum(1)
    return Gram(low=L.float(), diag_rest=rest.clamp(min=0).float())


@dataclass
class TaskStats:
    task: str
    tokens: int
    examples: int
    adapter: str  # digest of the adapter these statistics were measured with
    data: str  # digest of the examples
    grams: dict[str, Gram]  # module -> its input's Gram (modules that share an input share the object)
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in {id(g): g for g in self.grams.values()}.values())

    def to(self, device) -> TaskStats:
        moved = {id(g): g.to(device) for g in self.grams.values()}
        grams = {m: moved[id(g)] for m, g in self.grams.items()}
        return TaskStats(self.task, self.tokens, self.examples, self.adapter, self.data, grams, self.meta)

    def sketched(self, rank: int) -> TaskStats:
        """The same statistics with each Gram wider than `rank` as its top-`rank` eigenpairs + diagonal."""
        done = {id(g): g if g.dense is None else sketch(g.dense, rank) for g in self.grams.values()}
        grams = {m: done[id(g)] for m, g in self.grams.items()}
        meta = self.meta | {"sketch_rank": rank}
        return TaskStats(self.task, self.tokens, self.examples, self.adapter, self.data, grams, meta)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically, each distinct Gram once (`same_input` names the modules that share it)."""
        tensors, owner, same = {}, {}, {}
        for m, g in sorted(self.grams.items()):
            if id(g) in owner:
                same[PREFIX + m] = PREFIX + owner[id(g)]
                continue
            owner[id(g)] = m
            m = PREFIX + m
            if g.dense is not None:
                tensors[f"{m}.gram"] = g.dense.float().contiguous()
            else:
                tensors[f"{m}.gram_lowrank"] = g.low.float().contiguous()
                tensors[f"{m}.gram_diag"] = g.diag_rest.float().contiguous()
        meta = {k: str(v) for k, v in self.meta.items()} | {
            "format": "knots-serve-stats/1",
            "task": self.task,
            "tokens": str(self.tokens),
            "examples": str(self.examples),
            "adapter": self.adapter,
            "data": self.data,
            "same_input": json.dumps(same, sort_keys=True),
        }
        atomic_write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, task: str | None = None) -> TaskStats:
        """Read a statistics file; StatsError if it is not one (names the file and the problem)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
            same = json.loads(meta.get("same_input", "{}"))
            tokens = int(meta.get("tokens", "0"))
        except (OSError, SafetensorError, ValueError) as e:
            raise StatsError(f"{path}: not a readable statistics file ({e})") from None
        grams: dict[str, Gram] = {}
        for key, t in raw.items():
            if not bool(torch.isfinite(t).all()):
                raise StatsError(f"{path}: {key} has NaN or infinite entries")
            module, _, kind = key.rpartition(".")
            name = module.removeprefix(PREFIX)
            if kind == "gram":
                if t.ndim != 2 or t.shape[0] != t.shape[1]:
                    raise StatsError(f"{path}: {key} must be a square matrix, got shape {tuple(t.shape)}")
                if not torch.allclose(t, t.T, rtol=1e-4, atol=1e-6 * float(t.abs().max())):
                    raise StatsError(f"{path}: {key} is not symmetric (a Gram matrix is)")
                grams[name] = Gram(dense=t.float())
            elif kind == "gram_lowrank":
                d = raw.get(f"{module}.gram_diag")
                if d is None or t.ndim != 2 or d.shape != (t.shape[0],):
                    raise StatsError(f"{path}: {key} needs a {module}.gram_diag of {t.shape[0]} entries")
                grams[name] = Gram(low=t.float(), diag_rest=d.float())
            elif kind != "gram_diag":
                raise StatsError(f"{path}: unexpected tensor {key!r} (expected <module>.gram or .gram_lowrank)")
        for m, owner in same.items():
            m, owner = m.removeprefix(PREFIX), owner.removeprefix(PREFIX)
            if owner not in grams:
                raise StatsError(f"{path}: same_input names {owner!r} for {m!r}, which has no Gram")
            grams[m] = grams[owner]
        if not grams:
            raise StatsError(f"{path}: no Gram matrices in it")
        if not tokens:
            raise StatsError(f"{path}: metadata 'tokens' must be a positive count")
        name = meta.get("task") or task or Path(path).stem
        kept = ("format", "task", "tokens", "examples", "adapter", "data", "same_input")
        extra = {k: v for k, v in meta.items() if k not in kept}
        return cls(
            name, tokens, int(meta.get("examples", "0")), meta.get("adapter", ""), meta.get("data", ""), grams, extra
        )


def stats_summary(path: Path | None) -> dict | None:
    """From how many examples and tokens a statistics file was measured, and where it is (its header only)."""
    if path is None:
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {"tokens": int(meta.get("tokens", 0)), "examples": int(meta.get("examples", 0)), "file": str(path)}
    except (OSError, SafetensorError, ValueError):
        return None


def stats_name(task: str, adapter: str, data: str) -> str:
    """The file name of a task's statistics, keyed by the adapter's and the data's digests."""
    return f"{task}.{adapter[:16]}.{data[:16]}.safetensors"


class StatsDir:
    """The statistics of a deployment: one directory every server process and replica reads (state_dir/stats
    by default; a shared volume across hosts). `find(task, adapter_digest)` -> the newest file measured with
    that very adapter, or None: statistics of another version of the adapter are never used."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, stats: TaskStats) -> Path:
        return self.root / stats_name(stats.task, stats.adapter, stats.data)

    def put(self, stats: TaskStats) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(stats)
        stats.save(path)
        return path

    def get(self, task: str, adapter: str, data: str) -> TaskStats | None:
        """The statistics measured with this adapter on this very data, or None."""
        path = self.root / stats_name(task, adapter, data)
        return TaskStats.load(path, task) if path.is_file() else None

    def find(self, task: str, adapter: str) -> Path | None:
        if not self.root.is_dir():
            return None
        found = [p for p in self.root.glob(f"{task}.{adapter[:16]}.*.safetensors") if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)
