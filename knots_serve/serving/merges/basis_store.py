"""The task pool and its bases, resident on the compose device: what every merge is composed from.

- The pool's shared KnOTS basis is built (float64) when the pool changes — or loaded from basis_file when
  it was built from this same pool — and kept on the compose device in float32; other spaces' shared
  bases on first use.
- Each task's factors (s_i·B_i, A_i) are kept on the device too: TA and the spectral merges (any space)
  are composed straight from them, and a subset's own basis is built from them per request (cached within
  basis_cache_bytes, the cheapest to rebuild per byte dropped first: cache_policy.py).
- `basis: auto` (the default) picks per merge: the subset's own basis when its tasks' summed rank is at
  most half the pool's, else the shared basis. In the shared basis every task tensor has the pool's rank
  in rows, so a 2-task merge in a large pool would cost what the pool costs; with the rule a merge never
  costs more than about twice what its own subset needs (docs/BENCHMARKS.md, "Compose cost vs pool size").

`merge(sel)` returns the merged factors on the host (one copy at the end). Thread-safe.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from ...adapters import LoraAdapter, check_compatible
from ...basis import DEFAULT_RTOL, Basis, auto_basis, build_basis, fingerprint, lora_ranks
from ...compose import adapter_factors, merge_factors, merge_lora, to_host
from ...methods import factored, resolve
from ..errors import NotFound
from .cache_policy import GreedyDualSizeFrequency
from .names import Selection

SHARED_BASIS = "basis-knots-{}.safetensors"  # a pool's shared basis by its fingerprint (save_basis)


class UnknownTask(NotFound):
    """A selection names a task the server does not have (HTTP 404)."""


def compose_device(setting: str) -> torch.device:
    """`auto`: the GPU when torch sees one (where vLLM computes), else the CPU; or `cpu`, `cuda`, `cuda:N`.
    Raises ValueError for anything else, or for a CUDA device torch does not see here."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", setting):
        raise ValueError(f"compose_device must be auto, cpu, cuda or cuda:N, got {setting!r}")
    device = torch.device(setting)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"compose_device {setting!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    return device


class BasisStore:
    """The pool's adapters, their factors and bases on the compose device (the module doc says what each is).
    One class, past the ~150 lines a class gets here, because one lock guards the pool, its device copies and
    every cached basis together: a pool change (prepare, then install) swaps them as one, and a merge in
    flight must read one pool's copies, never two."""

    def __init__(
        self,
        adapters: dict[str, LoraAdapter],
        device: torch.device | str = "cpu",
        basis_file: Path | None = None,
        subset_bytes: int = 256 << 20,
    ):
        self.device, self.basis_file, self.subset_bytes = torch.device(device), basis_file, subset_bytes
        self.shared_root: Path | None = None  # with several API servers: cache_dir, where they save_basis
        self._lock = threading.Lock()
        self.set_pool(adapters)

    def set_pool(self, adapters: dict[str, LoraAdapter]) -> None:
        self.install(self.prepare(adapters))

    def prepare(self, adapters: dict[str, LoraAdapter]) -> dict:
        """A new pool, ready to install: checked, its shared KnOTS basis built (or loaded: from basis_file, or
        another API server's save_basis of this very pool) on the device, its factors there (the tasks it
        keeps reuse theirs). The slow part of a pool change; requests keep being served from the old pool
        meanwhile. Raises AdapterError for an incompatible pool."""
        pool = list(adapters.values())
        if pool:
            check_compatible(pool)
        knots = self._load_or_build(pool) if pool else None
        # what does not change is not copied again: a task already in the pool keeps its device factors
        before = (getattr(self, "adapters", {}), getattr(self, "_device_adapters", {}))
        on_device = {n: before[1][n] if before[0].get(n) is a else self._to_device(a) for n, a in adapters.items()}
        return {
            "adapters": dict(adapters),
            "_device_adapters": on_device,
            "_ranks": lora_ranks(adapters),
            "_pool_id": knots.fingerprint if knots else "",
            "_bases": {"knots": knots} if knots else {},
        }

    def _to_device(self, a: LoraAdapter) -> LoraAdapter:
        to = self.device
        modules = {m: type(lora)(A=lora.A.to(to), B=lora.B.to(to), scale=lora.scale) for m, lora in a.modules.items()}
        return LoraAdapter(a.name, modules, a.base_model, a.path)

    def install(self, prepared: dict) -> None:
        """Switch to a prepared pool (instant)."""
        with self._lock:
            self.__dict__.update(prepared)
        self.clear_subsets()

    def clear_subsets(self) -> None:
        """Drop the cached subset bases (a new pool; the benchmarks, to time a build)."""
        with self._lock:
            self._subset: dict[tuple, Basis] = {}
            self._subset_policy = GreedyDualSizeFrequency()  # which subset basis to drop first

    def _load_or_build(self, pool: list[LoraAdapter]) -> Basis:
        fp = fingerprint(pool, "knots", DEFAULT_RTOL) if self.basis_file or self.shared_root else None
        shared = sorted(self.shared_root.glob(f"knots-*/{SHARED_BASIS.format(fp)}")) if self.shared_root else []
        for path in [self.basis_file, *shared]:
            if path and path.exists():
                try:
                    saved = Basis.load(path)
                except (OSError, SafetensorError):
                    if path == self.basis_file:
                        raise
                    continue  # another API server's, deleted as it was read: build it
                if saved.fingerprint == fp:  # never another pool's
                    return saved.to(self.device)
        basis = build_basis(pool, "knots", device=self.device)
        if self.basis_file:
            self.basis_file.parent.mkdir(parents=True, exist_ok=True)
            basis.to("cpu").save(self.basis_file)
        return basis

    @property
    def pool_id(self) -> str:
        """Changes with the pool: the fingerprint of its shared basis (of every task's factors)."""
        return self._pool_id

    @property
    def base_model(self) -> str | None:
        return next((a.base_model for a in self.adapters.values() if a.base_model), None)

    def check(self, tasks) -> None:
        unknown = [t for t in tasks if t not in self.adapters]
        if unknown:
            raise UnknownTask(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(sorted(self.adapters))}")

    def choose(self, mode: str, tasks: tuple[str, ...]) -> str:
        """shared or subset for a merge of `tasks` (mode auto: by the rank rule of the module doc)."""
        return mode if mode != "auto" else auto_basis(tasks, self._ranks)

    def basis(self, space: str, mode: str, tasks: tuple[str, ...]) -> Basis:
        with self._lock:
            adapters, chosen = self._device_adapters, self.choose(mode, tasks)
            if chosen == "shared" and space in self._bases:
                return self._bases[space]
            key = (space, tasks)
            if chosen == "subset" and key in self._subset:
                self._subset_policy.hit(key)
                return self._subset[key]
            pool_id = self._pool_id
        members = list(adapters.values()) if chosen == "shared" else [adapters[t] for t in tasks]
        # a subset basis is named by the pool and the subset (hashing its factors again would cost more
        # than building it); the pool's own bases by their fingerprint
        name = None if chosen == "shared" else hashlib.sha256(f"{pool_id}/{space}/{tasks}".encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        basis = build_basis(
            members,
            space,
            device=self.device,
            fingerprint_as=name,
            dtype=torch.float64 if chosen == "shared" else torch.float32,
        )
        with self._lock:
            if adapters is not self._device_adapters:  # the pool changed meanwhile; do not cache a stale basis
                return basis
            if chosen == "shared":
                self._bases[space] = basis
            else:
                self._subset[key] = basis
                self._subset_policy.add(key, time.perf_counter() - t0, basis.nbytes())
                for old in self._subset_policy.victims(self.subset_bytes, lambda k: k != key):
                    del self._subset[old]
        return basis

    def plan(self, sel: Selection) -> tuple[int, str, int]:
        """Before composing: (an upper bound of the merge's LoRA rank, the module that attains it, the bytes
        of the compose's working set: the stacked float32 task tensors plus the merged one). Known from the
        method, the basis it is composed in and the tasks' ranks and shapes; builds nothing."""
        space, method = resolve(sel.spec.method)
        with self._lock:
            adapters, knots = self.adapters, self._bases.get("knots")
        shared = not factored(method) and self.choose(sel.basis, sel.tasks) == "shared"
        members = adapters.values() if shared else [adapters[t] for t in sel.tasks]
        rank, worst, sizes = 0, "", []
        for m in {m for t in sel.tasks for m in adapters[t].modules}:
            out, inp = next(a.modules[m].shape for a in members if m in a.modules)
            r = sum(a.modules[m].rank for a in members if m in a.modules)
            if space == "knots" and shared and knots is not None and m in knots.modules:
                r = knots.modules[m].left.shape[1]  # the resident basis's own k
            if factored(method):  # TA, spectral: the subset's Σr × Σr cores
                bound, rows, cols = min(r, out, inp), r, r
            elif space != "full":
                bound, rows, cols = min(r, out, inp), r, (inp if space == "knots" else r)
            else:  # a trimmed (or dropped) dense ΔW is full-rank in general
                bound, rows, cols = min(out, inp), out, inp
            sizes.append(0 if method.linear else (len(sel.tasks) + 1) * rows * cols * 4)
            if bound > rank:
                rank, worst = bound, m
        # one buffer over all modules: a global trim; a matrix method's stacks of every module
        whole = (method.trims and sel.spec.trim_scope == "global") or method.acts_on == "matrices"
        return rank, worst, sum(sizes) if whole else max(sizes, default=0)

    def merge(self, sel: Selection) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The merge's exact LoRA factors on the host, composed on the device."""
        space, method = resolve(sel.spec.method)
        if factored(method):  # TA and the spectral merges: the same in every space and basis, from the factors
            with self._lock:
                adapters = self._device_adapters
            lora = merge_factors(adapter_factors(adapters, sel.tasks), sel.spec)
        else:
            lora = merge_lora(self.basis(space, sel.basis, sel.tasks), sel.spec, max_rank=None)
        return to_host(lora)

    @staticmethod
    def save_basis(prepared: dict, directory: Path) -> Path | None:
        """A prepared pool's shared basis saved under `directory`, where the other API servers of a group, whose
        shared_root holds it, load it instead of building it again; None for an empty pool."""
        knots = prepared["_bases"].get("knots")
        if knots is None:
            return None
        path = directory / SHARED_BASIS.format(knots.fingerprint)
        knots.to("cpu").save(path)
        return path

    def basis_file_for(self, sel: Selection, directory: Path) -> Path:
        """The basis a merge is composed in, saved under `directory` (for the engine's workers to load)."""
        space, _ = resolve(sel.spec.method)
        basis = self.basis(space, sel.basis, sel.tasks)
        path = directory / f"basis-{space}-{basis.fingerprint}.safetensors"
        if not path.exists():
            basis.to("cpu").save(path)
        return path

    def nbytes(self) -> int:
        """Bytes resident on the device: the pool's factors, its bases, the cached subset bases."""
        with self._lock:
            factors = sum(_factor_bytes(a) for a in self._device_adapters.values())
            return factors + sum(b.nbytes() for b in (*self._bases.values(), *self._subset.values()))

    def task_nbytes(self, name: str) -> int:
        """Bytes of one task's factors on the device (0 for a task no longer in the pool)."""
        with self._lock:
            a = self._device_adapters.get(name)
            return _factor_bytes(a) if a else 0

    def shared_nbytes(self) -> int:
        """Bytes of the pool's shared KnOTS basis on the device (0 for an empty pool)."""
        with self._lock:
            return sum(b.nbytes() for b in self._bases.values())


def _factor_bytes(a: LoraAdapter) -> int:
    return sum(t.numel() * t.element_size() for m in a.modules.values() for t in (m.A, m.B))
