"""The composed-adapter cache of a running server: merges written as PEFT adapter directories for vLLM.

`AdapterCache.get(selection)` returns a PEFT adapter directory vLLM can load for a merge: from the cache,
or composed by the basis store (basis_store.py) and written to the tmpfs cache. Thread-safe; concurrent
calls for the same new merge compose it once. At most `workers` composes run at once, at most
`max_pending` distinct new merges wait or run; past that a new merge is refused at once (ComposeBusy,
HTTP 503 with Retry-After) instead of queueing without bound. The cache is bounded in bytes and evicts by
the expected cost of a miss (GreedyDual-Size-Frequency, cache_policy.py), not by recency alone; a merge
composed ahead of any request (`speculative`, server/speculate.py) enters with no hit, the first to go.
Before a merge's files are deleted it is reported to `on_evict` (the server then drops it from vLLM's
table, so that vLLM never loads a deleted path; the next request composes it again). Every compose writes a
new directory, so a merge composed again never shares a path with files about to be deleted.

A request holds its merge (`get(sel, hold=True)` ... `release(c)`) while vLLM serves it: a held merge is
never evicted, and one dropped with an old pool is deleted only when its last request is done, so vLLM
never finds the adapter it was told about gone from disk. While everything is held the cache can exceed
its bound by the held merges. A full or unwritable cache_dir is a CacheUnavailable (HTTP 503): nothing
cached is lost, and merges already cached, the base and the adapters keep serving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ...adapters import CONFIG_NAME, save_adapter
from ...atomic import atomic_write_dir
from ...methods import full_rank
from .. import metrics
from ..cluster import owned_dirs
from ..errors import BadRequest, Unavailable
from .basis_store import BasisStore, UnknownTask
from .cache_policy import GreedyDualSizeFrequency
from .fleet import Fleet, fleet_key
from .names import Selection, check_per_request


class CacheUnavailable(Unavailable):
    """The merge could not be written: cache_dir is full or not writable (HTTP 503)."""


class ComposeBusy(Unavailable):
    """Too many new merges are being composed; the client should retry after `retry_after` s (HTTP 503)."""

    retry_after = 1


@dataclass(frozen=True)
class Composed:
    name: str  # the canonical model string, vLLM's LoRA name
    path: Path
    nbytes: int
    rank: int
    stats: tuple[str, ...] = ()  # a data-aware merge: the statistics files it was composed from (stats_tag)
    source: str = "composed"  # where its files came from: composed here, "group" (another API server), "fleet"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


class AdapterCache:
    """The composed merges on disk (the module doc says how). One class, past the ~150 lines a class gets here,
    because one lock guards four things whose invariants span them all: the cached merges, the composes in
    flight (a merge composes once), the holds of requests (a held merge is never deleted) and the merges
    dropped while held (deleted by their last release)."""

    def __init__(
        self,
        store: BasisStore,
        cache_dir: Path,
        cache_bytes: int,
        max_lora_rank: int,
        workers: int = 2,
        max_pending: int = 16,
        max_bytes: int = 8 << 30,
        group: Path | None = None,
        fleet: Fleet | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.fleet = fleet or Fleet(None)  # the other replicas' merges (fleet.py); by default none
        self.dtype = dtype  # of the files: the engine's LoRA dtype, which vLLM converts a LoRA to when it loads it
        self.group = group  # with several API servers: their group's directory (group.py), for _group_lock
        self.store, self.cache_bytes, self.max_lora_rank = store, cache_bytes, max_lora_rank
        self.max_pending, self.max_bytes = max_pending, max_bytes  # max_bytes: one compose's working set
        self.on_evict: Callable[[Composed], None] = lambda c: None  # called before c's files are deleted
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(workers)
        self._cache: dict[str, Composed] = {}
        self._policy = GreedyDualSizeFrequency()  # what to evict first: the cheapest miss per byte
        self._inflight: dict[str, Future] = {}
        self._speculative: set[str] = set()  # composed ahead (speculate.py) and not used by a request yet
        self._held: dict[Path, int] = {}  # path -> requests using it now
        self._doomed: dict[Path, Composed] = {}  # dropped while held: deleted by the last release
        self._serial = itertools.count()
        self._generation = 0  # bumps when the pool changes: new paths, so vLLM never reuses stale KV blocks
        self.root = cache_dir  # the configured cache_dir, shared with other servers on this host
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir, fd = owned_dirs.claim(cache_dir)  # this instance's: every file it writes goes here
        owned_dirs.remove_dead(cache_dir, self.cache_dir)
        # removed with its lock released by close(), or at exit; a crashed server's by the next start
        self.close = weakref.finalize(self, owned_dirs.release, self.cache_dir, fd, os.getpid())

    def clear(self) -> None:
        """Drop every composed merge (the pool changed: with another shared basis every non-TA merge
        changes). Merges in use are deleted when their last request is done."""
        with self._lock:
            self._generation += 1
            dropped, self._cache, self._policy = list(self._cache.values()), {}, GreedyDualSizeFrequency()
            self._dropped([c.name for c in dropped])
        for c in dropped:
            self._evict(c)
        metrics.CACHE_BYTES.set(0)

    # --- composed merges --------------------------------------------------------------------------------
    def get(
        self, sel: Selection, hold: bool = False, admit: Callable[[], None] | None = None, speculative: bool = False
    ) -> Composed:
        """The merge's adapter; with hold=True it stays on disk until `release` (see the module doc).
        `admit()` runs once this call is about to start a compose (the merge checked, not cached, not being
        composed, a pending slot free) and may refuse it by raising: a client's budget of new merges is
        charged for the composes it starts, never for a refused merge or for joining one under way.
        speculative=True: composed ahead of any request (speculate.py), cached as nobody's hit yet."""
        self.store.check(sel.tasks)
        self._drop_stale(sel)
        name = sel.canonical
        with self._lock:
            if name not in self._cache and name not in self._inflight:
                t0 = time.perf_counter()
                self._check_plan(sel)
                metrics.NEW_MERGE_STAGE.labels("plan").observe(time.perf_counter() - t0)
            hit = self._take(name, hold, speculative)
            if hit is not None:
                return hit
            future = self._inflight.get(name)
            owner = future is None
            if owner and len(self._inflight) >= self.max_pending:
                metrics.COMPOSE_BUSY.inc()
                raise ComposeBusy(
                    f"{len(self._inflight)} new merges are being composed (the bound is "
                    f"{self.max_pending}); retry in {ComposeBusy.retry_after} s"
                )
            if owner:
                if admit is not None:
                    admit()
                future = self._inflight[name] = Future()
                generation = self._generation
        if not owner:
            metrics.CACHE.labels("wait").inc()
            composed = future.result()
            with self._lock:
                if not speculative:
                    self._used(name)
                if not hold or self._cache.get(name) is composed:
                    return self._hold(composed) if hold else composed
            return self.get(sel, hold)  # evicted before this waiter could hold it: compose it again
        metrics.CACHE.labels("speculative" if speculative else "miss").inc()
        try:
            composed = self._compose(sel, generation, hold, speculative)
            future.set_result(composed)
            return composed
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(name, None)

    def _check_plan(self, sel: Selection) -> None:
        """Refuse a merge this server would refuse after composing it, before any work (cost, rank, memory)."""
        check_per_request(sel)  # a MergeError: 400
        rank, module, nbytes = self.store.plan(sel)
        if rank > self.max_lora_rank:  # max_lora_rank is a vLLM rank: the padded rank fits iff the rank does
            dense = full_rank(sel.spec.method)
            why = (
                f"the dense-space merge {sel.spec.method!r} is full-rank in general (up to {rank} in {module})"
                if dense
                else f"the merge can reach rank {rank} (in {module})"
            )
            fix = (
                f"use knots-{sel.spec.method} (the same method in the KnOTS basis, exact at low rank), or pin it "
                "(POST /admin/pin adds the exact dense merge to the weights)"
                if dense
                else "merge fewer tasks or raise max_lora_rank"
            )
            raise BadRequest(
                f"{sel.canonical!r} is not served per request: {why}, above this server's "
                f"max_lora_rank {self.max_lora_rank}; {fix}"
            )
        if nbytes > self.max_bytes:
            raise BadRequest(
                f"{sel.canonical!r} would need about {nbytes / 2**20:.0f} MiB to compose, above this "
                f"server's compose_memory_bytes ({self.max_bytes / 2**20:.0f} MiB): merge fewer "
                "tasks, trim per module (trim_scope=module), or use basis=subset"
            )

    def hold_cached(self, sel: Selection) -> Composed | None:
        """The cached merge, held — or None (then `get` composes it). Never blocks on a compose."""
        self._drop_stale(sel)
        with self._lock:
            return self._take(sel.canonical, hold=True)

    def _drop_stale(self, sel: Selection) -> None:
        """A data-aware merge composed from statistics since measured again (`knots-serve stats` on new data,
        by any process of the deployment): dropped, so this request composes it from the new ones."""
        with self._lock:
            cached = self._cache.get(sel.canonical)
        if cached is None or not cached.stats or cached.stats == self.store.stats_tag(sel):
            return
        with self._lock:
            if self._cache.get(sel.canonical) is not cached:
                return
            self._pop(sel.canonical)
        self._evict(cached)
        metrics.CACHE_BYTES.set(self.cached_bytes())

    def _take(self, name: str, hold: bool, speculative: bool = False) -> Composed | None:
        """A cache hit (counted by the eviction policy, held if asked), or None; a speculative lookup counts
        nothing. Under the lock."""
        hit = self._cache.get(name)
        if hit is not None and not speculative:
            self._policy.hit(name)
            metrics.CACHE.labels("hit").inc()
            self._used(name)
            if hold:
                self._hold(hit)
        return hit

    def _used(self, name: str) -> None:
        """A request uses the merge: if it was composed speculatively, that compose was a hit. Under the lock."""
        if name in self._speculative:
            self._speculative.discard(name)
            metrics.SPECULATIVE.labels("hit").inc()

    def _dropped(self, names) -> None:
        """Merges leave the cache: a speculative one no request used was wasted. Under the lock."""
        for name in names:
            if name in self._speculative:
                self._speculative.discard(name)
                metrics.SPECULATIVE.labels("wasted").inc()

    def _compose(self, sel: Selection, generation: int, hold: bool, speculative: bool = False) -> Composed:
        while True:
            path, pool, stats, seconds, source = self._make(sel)
            composed = self._add(sel, path, generation, pool, stats, hold, seconds, speculative, source)
            if composed is not None:
                return composed
            generation = self._generation  # made in a pool that has since been replaced: again, in the new one

    def _make(self, sel: Selection) -> tuple[Path, str, tuple[str, ...], float, str]:
        """The merge's files (composed, linked from another API server of the group, or loaded from another
        replica: fleet.py), the pool's id, the statistics it is composed from, the seconds it took (what a miss
        costs again: the policy's cost) and where the files came from."""
        metrics.COMPOSE_QUEUE.inc()
        with self._slots:
            metrics.COMPOSE_QUEUE.dec()
            metrics.COMPOSE_RUNNING.inc()
            try:
                pool, stats = self.store.pool_id, self.store.stats_tag(sel)
                key = fleet_key(sel.canonical, pool, stats)  # the name of its files here, in the group, in the fleet
                t0 = time.perf_counter()
                with self._group_lock(key):
                    path = self.cache_dir / f"{key}-{next(self._serial)}"  # engine/fleet_files.py reads the key
                    source = "group"
                    if not self._link_from_group(key, path):
                        make = lambda: self._compose_here(sel, path)  # noqa: E731
                        source = self.fleet.load_or_make(key, path, make)
                        if source == "fleet":
                            metrics.NEW_MERGE_STAGE.labels("fleet").observe(time.perf_counter() - t0)
                return path, pool, stats, time.perf_counter() - t0, source
            finally:
                metrics.COMPOSE_RUNNING.dec()

    def _compose_here(self, sel: Selection, path: Path) -> None:
        t0 = time.perf_counter()
        lora = self.store.merge(sel)
        t1 = time.perf_counter()
        self._save(lora, path, sel.canonical)  # never truncated silently
        t2 = time.perf_counter()
        metrics.NEW_MERGE_STAGE.labels("compose").observe(t1 - t0)
        metrics.NEW_MERGE_STAGE.labels("write").observe(t2 - t1)
        metrics.COMPOSE_SECONDS.observe(t2 - t0)

    @contextlib.contextmanager
    def _group_lock(self, key: str):
        """With several API servers, one of them composes a new merge while the others wait, then link its
        files: a merge is composed once per group, not once per process."""
        if self.group is None:
            yield
            return
        fd = os.open(self.group / f"compose-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # in a compose thread: the wait holds up no event loop
            yield
        finally:
            os.close(fd)

    def _link_from_group(self, key: str, path: Path) -> bool:
        """Another group member's files of this merge, hard-linked at `path`: the bytes are shared, the names
        are each process's own, so its eviction there deletes nothing here. False if there are none (or they
        were deleted meanwhile)."""
        if self.group is None:
            return False
        for found in self.root.glob(f"knots-*/{key}-*"):
            if found.parent == self.cache_dir:
                continue
            try:
                atomic_write_dir(path, lambda tmp, found=found: [os.link(f, tmp / f.name) for f in found.iterdir()])
                metrics.CACHE.labels("linked").inc()
                return True
            except FileNotFoundError:  # evicted by its owner meanwhile
                continue
        return False

    def _add(self, sel: Selection, path: Path, generation: int, pool: str, stats, hold, seconds, speculative, source):
        """Cache the merge's files; None (and the files deleted) if they were made in a pool since replaced.
        A speculative merge enters with no hit and may itself be the one evicted to fit the bound."""
        rank = json.loads((path / CONFIG_NAME).read_text())["r"]
        composed = Composed(sel.canonical, path, _dir_bytes(path), rank, stats, source)
        with self._lock:
            stale = generation != self._generation or pool != self.store.pool_id
            if not stale:
                self._cache[sel.canonical] = self._hold(composed) if hold else composed
                self._policy.add(sel.canonical, seconds, composed.nbytes, hits=0 if speculative else 1)
                if speculative:
                    self._speculative.add(sel.canonical)
                    metrics.SPECULATIVE.labels("composed").inc()
                evicted = self._over_bound(keep=None if speculative else sel.canonical)
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            try:
                self.store.check(sel.tasks)
            except UnknownTask as e:
                raise UnknownTask(f"{e} (unregistered while the merge was composed)") from None
            return None
        for c in evicted:
            self._evict(c)
        metrics.CACHE_BYTES.set(self.cached_bytes())
        return composed

    def _save(self, lora, path: Path, name: str) -> Path:
        """Write the adapter; if cache_dir is full, drop every merge not in use and try once more."""
        for attempt in (1, 2):
            try:
                return save_adapter(lora, path, self.store.base_model, self.dtype, metadata={"model": name})
            except (OSError, SafetensorError) as e:  # safetensors reports ENOSPC as its own error
                full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e)
                with self._lock:
                    idle = [n for n, c in self._cache.items() if c.path not in self._held]
                    evicted = [self._pop(n) for n in idle] if full else []
                for c in evicted:
                    self._evict(c)
                if attempt == 2 or not evicted:
                    reason = "no space left on device" if full else getattr(e, "strerror", None) or str(e)
                    raise CacheUnavailable(
                        f"cannot write the merge {name!r} to the cache ({self.cache_dir}): {reason}; try again later"
                    ) from None
        raise AssertionError("unreachable")

    def _over_bound(self, keep: str) -> list[Composed]:
        """Pop the merges whose misses cost least (cache_policy.py), never one in use, until the cache fits
        its bound (under the lock)."""
        victims = self._policy.victims(self.cache_bytes, lambda n: n != keep and self._cache[n].path not in self._held)
        metrics.CACHE_EVICTIONS.inc(len(victims))
        self._dropped(victims)
        return [self._cache.pop(n) for n in victims]

    def _pop(self, name: str) -> Composed:
        self._policy.remove(name)
        metrics.CACHE_EVICTIONS.inc()
        self._dropped([name])
        return self._cache.pop(name)

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

    def held(self, name: str) -> Composed | None:
        """The merge of that name that a request holds now (the cached one first, else one dropped with an
        old pool and still in use), or None."""
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.path in self._held:
                return cached
            return next((c for c in self._doomed.values() if c.name == name), None)  # doomed: held by definition

    def cached(self) -> list[Composed]:
        with self._lock:
            return list(self._cache.values())

    def composing_now(self) -> list[str]:
        with self._lock:
            return sorted(self._inflight)

    def describe(self) -> list[dict]:
        """Every cached merge with what the eviction policy knows of it, the most valuable first."""
        with self._lock:
            rows = [
                {
                    "model": name,
                    "bytes": c.nbytes,
                    "rank": c.rank,
                    "hits": self._policy.entries[name].hits,
                    "compose_s": round(self._policy.entries[name].cost, 4),
                    "priority": self._policy.entries[name].priority,
                    "last_used": self._policy.entries[name].last_used,
                    "in_use": self._held.get(c.path, 0),
                    "stats": list(c.stats),
                    "speculative": name in self._speculative,
                    "source": c.source,
                }
                for name, c in self._cache.items()
            ]
        return sorted(rows, key=lambda r: -r["priority"])

    def knows(self, name: str) -> bool:
        """Cached or being composed."""
        with self._lock:
            return name in self._cache or name in self._inflight

    def room_for_one(self) -> bool:
        """Is there room for one more merge of the cached ones' mean size without evicting (speculate.py)?"""
        with self._lock:
            sizes = [c.nbytes for c in self._cache.values()]
        return not sizes or self.cache_bytes - sum(sizes) >= sum(sizes) / len(sizes)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._cache.values())
