"""The task pool and its bases, resident on the compose device: what every merge is composed from.

- The pool's shared bases (KnOTS, or another space's) are built (float64) on first use — or, for KnOTS,
  loaded from basis_file or from another API server's copy when one was built from this same pool — and
  kept on the compose device in float32. Lazily: with `basis: auto` a merge of a few tasks in a large pool
  never needs one, and a pool change then costs its new adapters' copies and hashes, not an SVD over the
  whole pool (docs/BENCHMARKS.md, "A large pool").
- Each task's factors (s_i·B_i, A_i) are kept on the device too: TA and the spectral merges (any space)
  are composed straight from them, and a subset's own basis is built from them per request (cached within
  basis_cache_bytes, the cheapest to rebuild per byte dropped first: cache_policy.py).
- Each task's statistics (stats.py), for the data-aware merges: found in stats_dir by the task's adapter
  digest on each new merge (so statistics measured while the server runs are used by the next merge, and
  every server process sharing the state dir reads the same files), loaded once per file to the device.
- `basis: auto` (the default) picks per merge: the subset's own basis when its tasks' summed rank is at
  most half the pool's, else the shared basis. In the shared basis every task tensor has the pool's rank
  in rows, so a 2-task merge in a large pool would cost what the pool costs; with the rule a merge never
  costs more than about twice what its own subset needs (docs/BENCHMARKS.md, "Compose cost vs pool size").

`merge(sel)` returns the merged factors on the host (one copy at the end). Thread-safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from ...adapters import LoraAdapter, check_compatible
from ...atomic import atomic_write_file
from ...basis import DEFAULT_RTOL, Basis, auto_basis, build_basis, column_range, fingerprint, lora_ranks, rtol_for
from ...compose import MergeError, adapter_factors, merge_factors, merge_lora, missing_stats, to_host
from ...methods import factored, resolve
from ...stats import StatsDir, StatsError, TaskStats
from ..errors import NotFound
from .cache_policy import GreedyDualSizeFrequency
from .names import Selection

SHARED_BASIS = "basis-knots-{}.safetensors"  # a pool's shared basis by its fingerprint (save_basis)
# RegMean solves I×I per module input; past this many input features per request it is core-regmean's job
REGMEAN_MAX_INPUT = 8192


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
        stats_dir: Path | None = None,
    ):
        self.device, self.basis_file, self.subset_bytes = torch.device(device), basis_file, subset_bytes
        self.stats_dir = StatsDir(stats_dir) if stats_dir else None
        self._stats: dict[Path, tuple[int, TaskStats]] = {}  # file -> (its mtime, its statistics on the device)
        # with several API servers: the cache_dir they share, where each saves the shared basis it builds
        # (save_dir, its own instance dir) for the others to load
        self.shared_root: Path | None = None
        self.save_dir: Path | None = None
        self._saved: Path | None = None  # the shared basis this process saved in save_dir
        self._lock = threading.Lock()
        self._build = threading.Lock()  # one shared-basis build at a time: a pool's SVD is never run twice at once
        self.set_pool(adapters)

    def set_pool(self, adapters: dict[str, LoraAdapter]) -> None:
        self.install(self.prepare(adapters))

    def prepare(self, adapters: dict[str, LoraAdapter]) -> dict:
        """A new pool, ready to install: checked, fingerprinted (the hash of each new adapter's factors), its
        factors on the device (the tasks it keeps reuse theirs). Its shared bases come on first use (basis).
        Requests keep being served from the old pool meanwhile. Raises AdapterError for an incompatible pool."""
        pool = list(adapters.values())
        if pool:
            check_compatible(pool)
        # what does not change is not copied again: a task already in the pool keeps its device factors
        before = (getattr(self, "adapters", {}), getattr(self, "_device_adapters", {}))
        on_device = {n: before[1][n] if before[0].get(n) is a else self._to_device(a) for n, a in adapters.items()}
        return {
            "adapters": dict(adapters),
            "_device_adapters": on_device,
            "_ranks": lora_ranks(adapters),
            "_pool_id": fingerprint(pool, "knots", DEFAULT_RTOL) if pool else "",  # the KnOTS basis's name too
            "_bases": {},
            "_frames": {},  # core-regmean: per module, the pool's A-span (core_stats)
            "_projected": {},  # core-regmean: id(task statistics) -> (them, their Grams on those frames)
        }

    def _to_device(self, a: LoraAdapter) -> LoraAdapter:
        to = self.device
        modules = {m: type(lora)(A=lora.A.to(to), B=lora.B.to(to), scale=lora.scale) for m, lora in a.modules.items()}
        return LoraAdapter(a.name, modules, a.base_model, a.path)

    def install(self, prepared: dict) -> None:
        """Switch to a prepared pool (instant). The shared basis this process saved for the old pool goes."""
        with self._lock:
            self.__dict__.update(prepared)
        self.clear_subsets()
        if self._saved is not None and self._saved.name != SHARED_BASIS.format(self._pool_id):
            self._saved.unlink(missing_ok=True)
            self._saved = None

    def clear_subsets(self) -> None:
        """Drop the cached subset bases (a new pool; the benchmarks, to time a build)."""
        with self._lock:
            self._subset: dict[tuple, Basis] = {}
            self._subset_policy = GreedyDualSizeFrequency()  # which subset basis to drop first

    def _load_or_build(self, space: str, members: list[LoraAdapter], pool_id: str) -> Basis:
        """A pool's shared basis of `space`. KnOTS: loaded when basis_file or another API server's copy was
        built from this very pool, else built and saved there (basis_file; save_dir for the others). An
        unreadable copy is built again (and basis_file written over)."""
        name = pool_id if space == "knots" else hashlib.sha256(f"{pool_id}/{space}".encode()).hexdigest()[:16]
        if space != "knots":
            return build_basis(members, space, device=self.device, fingerprint_as=name)
        root = self.shared_root
        shared = sorted(root.glob(f"knots-*/{SHARED_BASIS.format(pool_id)}")) if root else []
        for path in [self.basis_file, *shared]:
            if path and path.exists():
                try:
                    saved = Basis.load(path)
                except (OSError, SafetensorError):  # another API server's, deleted as it was read; a bad file
                    continue
                if saved.fingerprint == pool_id:  # never another pool's
                    return saved.to(self.device)
        basis = build_basis(members, space, device=self.device, fingerprint_as=pool_id)
        if self.save_dir:
            self._saved = self.save_dir / SHARED_BASIS.format(pool_id)
        for path in (self.basis_file, self.save_dir and self._saved):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_file(path, lambda tmp: basis.to("cpu").save(tmp))
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
        if self.choose(mode, tasks) == "shared":
            with self._lock:
                if space in self._bases:
                    return self._bases[space]
            with self._build:  # a first use waits for the build under way, never runs a second one
                return self._shared(space)
        with self._lock:
            adapters, key, pool_id = self._device_adapters, (space, tasks), self._pool_id
            if key in self._subset:
                self._subset_policy.hit(key)
                return self._subset[key]
        # a subset basis is named by the pool and the subset (hashing its factors again would cost more
        # than building it), in float32: enough for a per-request basis
        name = hashlib.sha256(f"{pool_id}/{space}/{tasks}".encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        members = [adapters[t] for t in tasks]
        basis = build_basis(members, space, device=self.device, fingerprint_as=name, dtype=torch.float32)
        with self._lock:
            if adapters is not self._device_adapters:  # the pool changed meanwhile; do not cache a stale basis
                return basis
            self._subset[key] = basis
            self._subset_policy.add(key, time.perf_counter() - t0, basis.nbytes())
            for old in self._subset_policy.victims(self.subset_bytes, lambda k: k != key):
                del self._subset[old]
        return basis

    def _shared(self, space: str) -> Basis:
        """The pool's shared basis of `space`, built (or loaded) on first use and kept with the pool."""
        with self._lock:
            if space in self._bases:
                return self._bases[space]
            adapters, pool_id = self._device_adapters, self._pool_id
        basis = self._load_or_build(space, list(adapters.values()), pool_id)
        with self._lock:
            if adapters is self._device_adapters:  # not for a pool that changed meanwhile
                self._bases[space] = basis
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
        rank, worst, sizes, widest = 0, "", [], 0
        for m in {m for t in sel.tasks for m in adapters[t].modules}:
            out, inp = next(a.modules[m].shape for a in members if m in a.modules)
            r = sum(a.modules[m].rank for a in members if m in a.modules)
            if space == "knots" and shared and knots is not None and m in knots.modules:
                r = knots.modules[m].left.shape[1]  # the resident basis's own k
            if method.data:  # RegMean: the tasks' reduced Grams and H (I×I), or a Σr-sized solve (core)
                bound, rows, cols = min(r, out, inp), (inp if space != "core" else r), (inp if space != "core" else r)
                widest = max(widest, inp)
            elif factored(method):  # TA, spectral: the subset's Σr × Σr cores
                bound, rows, cols = min(r, out, inp), r, r
            elif space != "full":
                bound, rows, cols = min(r, out, inp), r, (inp if space == "knots" else r)
            else:  # a trimmed (or dropped) dense ΔW is full-rank in general
                bound, rows, cols = min(out, inp), out, inp
            sizes.append(0 if method.linear else (len(sel.tasks) + 1) * rows * cols * 4)
            if bound > rank:
                rank, worst = bound, m
        if method.data:
            lacking = [t for t in sel.tasks if self.stats_file(t) is None]  # found, not loaded: that is merge's
            if lacking:
                raise MergeError(missing_stats(lacking))
            if space != "core" and widest > REGMEAN_MAX_INPUT:
                raise MergeError(
                    f"{sel.spec.method!r} solves an I×I system per module and a module here reads {widest} features "
                    f"(this server's bound: {REGMEAN_MAX_INPUT}); use core-regmean (the solve in the tasks' A-span)"
                )
        # one buffer over all modules: a global trim; a matrix method's stacks of every module
        whole = (method.trims and sel.spec.trim_scope == "global") or method.acts_on == "matrices"
        return rank, worst, sum(sizes) if whole else max(sizes, default=0)

    def merge(self, sel: Selection) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The merge's exact LoRA factors on the host, composed on the device."""
        space, method = resolve(sel.spec.method)
        if factored(method):  # TA and the spectral merges: the same in every space and basis, from the factors
            with self._lock:
                adapters = self._device_adapters
            stats, frames = None, None
            if method.data:
                stats, frames = self.core_stats(sel.tasks) if space == "core" else (self.task_stats(sel.tasks), None)
            lora = merge_factors(adapter_factors(adapters, sel.tasks), sel.spec, stats=stats, frames=frames)
        else:
            lora = merge_lora(self.basis(space, sel.basis, sel.tasks), sel.spec, max_rank=None)
        return to_host(lora)

    def stats_file(self, task: str) -> Path | None:
        """The statistics file measured with this task's current adapter, or None."""
        with self._lock:
            a = self.adapters.get(task)
        return self.stats_dir.find(task, a.digest) if a is not None and self.stats_dir else None

    def stats_tag(self, sel: Selection) -> tuple[str, ...]:
        """The statistics files a data-aware merge reads now (name and mtime per task; () for any other merge):
        a cached merge whose tag changed is composed again (adapter_cache.py)."""
        if self.stats_dir is None or not resolve(sel.spec.method)[1].data:
            return ()
        tag = []
        for t in sel.tasks:
            path = self.stats_file(t)
            try:
                tag.append(f"{path.name}@{path.stat().st_mtime_ns}" if path else "")
            except OSError:  # removed since found
                tag.append("")
        return tuple(tag) if any(tag) else ()

    def task_stats(self, tasks) -> dict[str, TaskStats]:
        """{task: its statistics on the device}; a MergeError (400) naming every task without statistics."""
        found = {t: self.stats_file(t) for t in tasks}
        lacking = [t for t, p in found.items() if p is None]
        if lacking:
            raise MergeError(missing_stats(lacking))
        out = {}
        for t, path in found.items():
            with self._lock:
                cached = self._stats.get(path)
            try:
                mtime = path.stat().st_mtime_ns
                if cached is None or cached[0] != mtime:
                    cached = None
                    stats = TaskStats.load(path, t).to(self.device)
            except (StatsError, OSError) as e:  # a bad file; one removed as it was read
                raise MergeError(f"task {t!r}: {e}") from None
            if cached is None:
                with self._lock:
                    self._stats = {p: v for p, v in self._stats.items() if p.exists()} | {path: (mtime, stats)}
                cached = (mtime, stats)
            out[t] = cached[1]
        return out

    def core_stats(self, tasks) -> tuple[dict[str, TaskStats], dict[str, torch.Tensor]]:
        """core-regmean's inputs: per module the pool's A-span V (I×R_pool orthonormal, built once per pool)
        and each task's Grams projected on it (R_pool×R_pool, once per pool and statistics file). Every
        subset's A-span lies in V, so the merge is the same as from the full Grams, at a cost that follows
        the pool's rank, not I² (docs/BENCHMARKS.md, "Compose cost per method")."""
        full = self.task_stats(tasks)
        with self._lock:
            adapters, frames, projected = self._device_adapters, self._frames, self._projected
        if not frames:
            modules = {m for a in adapters.values() for m in a.modules}
            frames = {
                m: column_range(
                    torch.cat([a.modules[m].A.double() for a in adapters.values() if m in a.modules]).T,
                    rtol_for(torch.float32),
                ).float()
                for m in modules
            }
        out = {}
        for t, s in full.items():
            if id(s) not in projected:
                grams = {m: g.project(frames[m]) for m, g in s.grams.items() if m in frames}
                projected = {**projected, id(s): (s, dataclasses.replace(s, grams=grams))}
            out[t] = projected[id(s)][1]
        with self._lock:
            if adapters is self._device_adapters:  # not for a pool that changed meanwhile
                live = {id(v[1]) for v in self._stats.values()}
                self._frames, self._projected = frames, {k: v for k, v in projected.items() if k in live}
        return out, frames

    def basis_file_for(self, sel: Selection, directory: Path) -> Path:
        """The basis a merge is composed in, saved under `directory` (for the engine's workers to load)."""
        space, _ = resolve(sel.spec.method)
        basis = self.basis(space, sel.basis, sel.tasks)
        path = directory / f"basis-{space}-{basis.fingerprint}.safetensors"
        if not path.exists():
            basis.to("cpu").save(path)
        return path

    def nbytes(self) -> int:
        """Bytes resident on the device: the pool's factors, its bases, the cached subset bases, statistics."""
        with self._lock:
            factors = sum(_factor_bytes(a) for a in self._device_adapters.values())
            stats = sum(s.nbytes() for _, s in self._stats.values())
            stats += sum(s.nbytes() for _, s in self._projected.values())
            stats += sum(V.numel() * V.element_size() for V in self._frames.values())
            return factors + stats + sum(b.nbytes() for b in (*self._bases.values(), *self._subset.values()))

    def task_nbytes(self, name: str) -> int:
        """Bytes of one task's factors on the device (0 for a task no longer in the pool)."""
        with self._lock:
            a = self._device_adapters.get(name)
            return _factor_bytes(a) if a else 0

    def shared_nbytes(self) -> int:
        """Bytes of the pool's shared bases on the device (0 until a merge needs one)."""
        with self._lock:
            return sum(b.nbytes() for b in self._bases.values())


def _factor_bytes(a: LoraAdapter) -> int:
    """A task's factors on the device, with the QRs of B and Aᵀ that subset bases keep (basis.lora_frames)."""
    tensors = [t for m in a.modules.values() for t in (m.A, m.B, *(x for f in m.frames.values() for x in f))]
    return sum(t.numel() * t.element_size() for t in tensors)
