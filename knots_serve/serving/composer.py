"""The resident pool and the composed-adapter cache of a running server.

`Composer.get(selection)` returns a PEFT adapter directory vLLM can load for a merge: from the cache, or
composed from the resident basis and written to the tmpfs cache. Thread-safe; concurrent calls for the
same new merge compose it once. The cache is an LRU bounded in bytes. Before a merge's files are deleted
it is reported to `on_evict` (the server then drops it from vLLM's table, so that vLLM never loads a
deleted path; the next request composes it again). Every compose writes a new directory, so a merge
composed again never shares a path with files about to be deleted.

A request holds its merge (`get(sel, hold=True)` ... `release(c)`) while vLLM serves it: a held merge is
never evicted, and one dropped with an old pool is deleted only when its last request is done, so vLLM
never finds the adapter it was told about gone from disk. While everything is held the cache can exceed
its bound by the held merges. A full or unwritable cache_dir is a CacheUnavailable (HTTP 503): nothing
cached is lost, and merges already cached, the base and the adapters keep serving.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import re
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from ..adapters import LoraAdapter, check_compatible, padded_rank, save_adapter
from ..basis import Basis, build_basis
from ..compose import MergeError, merge_lora
from ..methods import resolve
from . import metrics
from .names import Selection


# what the composer writes into cache_dir: merges, basis files for the workers, temporaries of atomic writes
OWNED = re.compile(r"^(\.?[0-9a-f]{20}-g\d+-\d+(\..+)?|basis-\w+-[0-9a-f]{16}\.safetensors|\.basis-.+\.tmp\d+)$")


class UnknownTask(MergeError):
    """A selection names a task the server does not have (HTTP 404)."""


class CacheUnavailable(MergeError):
    """The merge could not be written: cache_dir is full or not writable (HTTP 503)."""


@dataclass(frozen=True)
class Composed:
    name: str  # the canonical model string, vLLM's LoRA name
    path: Path
    nbytes: int
    rank: int


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


class Composer:
    def __init__(self, adapters: dict[str, LoraAdapter], cache_dir: Path, cache_bytes: int, max_lora_rank: int,
                 basis_file: Path | None = None, subset_bases: int = 8):
        self.cache_dir, self.cache_bytes, self.max_lora_rank = cache_dir, cache_bytes, max_lora_rank
        self.basis_file, self.subset_bases = basis_file, subset_bases
        self.on_evict: Callable[[Composed], None] = lambda c: None  # called before c's files are deleted
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Composed] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._held: dict[Path, int] = {}  # path -> requests using it now
        self._doomed: dict[Path, Composed] = {}  # dropped while held: deleted by the last release
        self._serial = itertools.count()
        self._generation = 0  # bumps when the pool changes: new paths, so vLLM never reuses stale KV blocks
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.iterdir():  # a previous run's merges; only what this class writes is removed
            if OWNED.match(stale.name):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.set_pool(adapters)

    # --- the pool and its bases -------------------------------------------------------------------------
    def set_pool(self, adapters: dict[str, LoraAdapter]) -> None:
        """Replace the task pool. Builds the shared KnOTS basis now (or loads basis_file when it was built
        from this same pool); other spaces are built on first use. Every composed merge is dropped:
        with another pool, the shared basis — and so every non-TA merge — changes."""
        pool = list(adapters.values())
        if pool:
            check_compatible(pool)
        knots = self._load_or_build(pool) if pool else None
        with self._lock:
            self.adapters = dict(adapters)
            self._bases: dict[str, Basis] = {"knots": knots} if knots else {}
            self._subset: OrderedDict[tuple, Basis] = OrderedDict()
            self._generation += 1
            dropped, self._cache = list(self._cache.values()), OrderedDict()
        for c in dropped:
            self._evict(c)
        metrics.CACHE_BYTES.set(0)  # every composed merge was dropped with the old pool

    def _load_or_build(self, pool: list[LoraAdapter]) -> Basis:
        from ..basis import DEFAULT_RTOL, fingerprint

        if self.basis_file and self.basis_file.exists():
            saved = Basis.load(self.basis_file)
            if saved.fingerprint == fingerprint(pool, "knots", DEFAULT_RTOL):
                return saved
        basis = build_basis(pool, "knots")
        if self.basis_file:
            self.basis_file.parent.mkdir(parents=True, exist_ok=True)
            basis.save(self.basis_file)
        return basis

    def _basis(self, space: str, mode: str, tasks: tuple[str, ...]) -> Basis:
        with self._lock:
            adapters = self.adapters
            if mode == "shared" and space in self._bases:
                return self._bases[space]
            key = (space, tasks)
            if mode == "subset" and key in self._subset:
                self._subset.move_to_end(key)
                return self._subset[key]
        chosen = adapters.values() if mode == "shared" else [adapters[t] for t in tasks]
        basis = build_basis(list(chosen), space)
        with self._lock:
            if adapters is not self.adapters:  # the pool changed meanwhile; do not cache a stale basis
                return basis
            if mode == "shared":
                self._bases[space] = basis
            else:
                self._subset[key] = basis
                while len(self._subset) > self.subset_bases:
                    self._subset.popitem(last=False)
        return basis

    def basis_file_for(self, sel: Selection) -> Path:
        """The basis a merge is composed in, saved under cache_dir (for the workers to load, once)."""
        space, _ = resolve(sel.spec.method)
        basis = self._basis(space, sel.basis, sel.tasks)
        path = self.cache_dir / f"basis-{space}-{basis.fingerprint}.safetensors"
        if not path.exists():
            basis.save(path)
        return path

    # --- composed merges --------------------------------------------------------------------------------
    def get(self, sel: Selection, hold: bool = False) -> Composed:
        """The merge's adapter; with hold=True it stays on disk until `release` (see the module doc)."""
        unknown = [t for t in sel.tasks if t not in self.adapters]
        if unknown:
            raise UnknownTask(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(sorted(self.adapters))}")
        name = sel.canonical
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None:
                self._cache.move_to_end(name)
                metrics.CACHE.labels("hit").inc()
                return self._hold(hit) if hold else hit
            future = self._inflight.get(name)
            owner = future is None
            if owner:
                future = self._inflight[name] = Future()
                generation = self._generation
        if not owner:
            metrics.CACHE.labels("wait").inc()
            composed = future.result()
            with self._lock:
                if not hold or self._cache.get(name) is composed:
                    return self._hold(composed) if hold else composed
            return self.get(sel, hold)  # evicted before this waiter could hold it: compose it again
        metrics.CACHE.labels("miss").inc()
        try:
            composed = self._compose(sel, generation, hold)
            future.set_result(composed)
            return composed
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)

    def _compose(self, sel: Selection, generation: int, hold: bool) -> Composed:
        t0 = time.perf_counter()
        space, _ = resolve(sel.spec.method)
        basis = self._basis(space, sel.basis, sel.tasks)
        lora = merge_lora(basis, sel.spec, max_rank=None)  # never truncate silently: refuse below instead
        rank = padded_rank(max((B.shape[1] for B, _ in lora.values()), default=1))
        if rank > self.max_lora_rank:
            raise MergeError(f"the merge {sel.canonical!r} has rank {rank}, above this server's max_lora_rank "
                             f"{self.max_lora_rank}: merge fewer tasks, use a knots-/core- method (a dense-space "
                             "merge is full-rank), or raise max_lora_rank")
        digest = hashlib.sha256(sel.canonical.encode()).hexdigest()[:20]
        path = self.cache_dir / f"{digest}-g{generation}-{next(self._serial)}"
        path = self._save(lora, path, basis.base_model, sel.canonical)
        composed = Composed(sel.canonical, path, _dir_bytes(path), rank)
        metrics.COMPOSE_SECONDS.observe(time.perf_counter() - t0)
        with self._lock:
            stale, retry = generation != self._generation, self._generation
            if not stale:
                self._cache[sel.canonical] = self._hold(composed) if hold else composed
                evicted = self._over_bound(keep=sel.canonical)
            unknown = [t for t in sel.tasks if t not in self.adapters]
        if stale:  # composed against a pool that has since been replaced: again, in the new one
            shutil.rmtree(path, ignore_errors=True)
            if unknown:
                raise UnknownTask(f"task(s) {', '.join(unknown)} were unregistered while the merge was composed")
            return self._compose(sel, retry, hold)
        for c in evicted:
            self._evict(c)
        metrics.CACHE_BYTES.set(self.cached_bytes())
        return composed

    def _save(self, lora, path: Path, base_model, name: str) -> Path:
        """Write the adapter; if cache_dir is full, drop every merge not in use and try once more."""
        for attempt in (1, 2):
            try:
                return save_adapter(lora, path, base_model, metadata={"model": name})
            except (OSError, SafetensorError) as e:  # safetensors reports ENOSPC as its own error
                full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e)
                with self._lock:
                    idle = [n for n, c in self._cache.items() if c.path not in self._held]
                    evicted = [self._cache.pop(n) for n in idle] if full else []
                for c in evicted:
                    self._evict(c)
                if attempt == 2 or not evicted:
                    reason = "no space left on device" if full else getattr(e, "strerror", None) or str(e)
                    raise CacheUnavailable(f"cannot write the merge {name!r} to the cache ({self.cache_dir}): "
                                           f"{reason}; try again later") from None
        raise AssertionError("unreachable")

    def _over_bound(self, keep: str) -> list[Composed]:
        """Pop least recently used merges not in use until the cache fits its bound (under the lock)."""
        evicted, size = [], sum(c.nbytes for c in self._cache.values())
        for name, c in list(self._cache.items()):
            if size <= self.cache_bytes:
                break
            if name != keep and c.path not in self._held:
                evicted.append(self._cache.pop(name))
                size -= c.nbytes
        return evicted

    def _hold(self, c: Composed) -> Composed:
        self._held[c.path] = self._held.get(c.path, 0) + 1
        return c

    def release(self, c: Composed) -> None:
        """A request that held `c` is done with it."""
        with self._lock:
            self._held[c.path] -= 1
            if self._held[c.path]:
                return
            del self._held[c.path]
            doomed = self._doomed.pop(c.path, None)
        if doomed:
            self._delete(c)

    def _evict(self, c: Composed) -> None:
        with self._lock:
            if c.path in self._held:  # in use: the last release deletes it
                self._doomed[c.path] = c
                return
        self._delete(c)

    def _delete(self, c: Composed) -> None:
        self.on_evict(c)
        shutil.rmtree(c.path, ignore_errors=True)

    def lookup(self, name: str) -> Composed | None:
        """The cached merge of that name, or else one still in use by a request (dropped with an old pool)."""
        with self._lock:
            return self._cache.get(name) or next((c for c in self._doomed.values() if c.name == name), None)

    def cached(self) -> list[Composed]:
        with self._lock:
            return list(self._cache.values())

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._cache.values())
