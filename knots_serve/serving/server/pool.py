"""The task pool of one API server: which tasks it serves (the config's plus runtime registrations, kept in the
store's task table), where each came from, and the one path every pool change takes (`change`): an admin
registration, an unregistration, or a change another replica wrote to the store (sync.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ...adapters import WEIGHTS_NAME, AdapterError, LoraAdapter, adapter_dir, is_hub_ref, load_adapter, parse_hub_ref
from ...stats import StatsError, TaskStats, stats_summary
from ..errors import BadRequest, Conflict, Unavailable
from ..merges.basis_store import UnknownTask
from ..merges.names import PREFIX, check_task_name


class FilesChanged(Unavailable):
    """A task's adapter files changed on disk after they were loaded (HTTP 503)."""


class Pool:
    def __init__(self, server):
        self.server = server
        self.lock = asyncio.Lock()  # one pool change at a time, an admin's or the store's
        self.sources = server.tasks.items()  # name -> path or hf:// reference, of the tasks in the pool
        self.stamps: dict[str, tuple[int, int] | None] = {}  # name -> its weights file's (size, mtime) at load

    def load(self) -> dict[str, LoraAdapter]:
        """The pool's adapters at start, read from disk (the Hub's through the directory vLLM was started with)."""
        adapters = {n: load_adapter(self._started_with(n, p), n) for n, p in self.sources.items()}
        self.stamps = {n: _stamp(Path(a.path) / WEIGHTS_NAME) for n, a in adapters.items()}
        return adapters

    def _started_with(self, name: str, ref: str) -> str:
        """Where to read a task's adapter at start: an hf:// task from the directory vLLM was started with
        (`knots-serve serve` resolved it for --lora-modules), so the merges and the plain adapter are the
        same files even if the repo's branch moved meanwhile; anything else as configured."""
        known = self.server.models.lora_requests.get(name) if is_hub_ref(ref) else None
        return known.lora_path if known is not None else ref

    def check_files(self, task: str) -> None:
        """vLLM reads a task's own adapter from its files whenever it (re)loads it, and a failed load inside
        a batch kills vLLM's engine. So a request for the plain adapter is refused (503) when the weights
        file is gone or changed since it was loaded; merges are composed from the copy in memory."""
        path = Path(self.server.bases.adapters[task].path) / WEIGHTS_NAME
        if _stamp(path) != self.stamps.get(task):
            raise FilesChanged(
                f"task {task!r}: its adapter file {path} is gone or changed on disk since it was "
                f"loaded; merges with it still work (from memory); re-register it to serve it alone"
            )

    def admitted(self, path: str) -> str:
        """The source a registration may come from (a local path resolved, an hf:// reference as given), or
        BadRequest; also checked for registrations made through other replicas (sync.py)."""
        cfg = self.server.cfg
        if is_hub_ref(path):
            repo = parse_hub_ref(path).repo_id  # AdapterError (400) naming what is wrong
            if not cfg.allows_repo(repo):
                raise BadRequest(f"Hub adapter {path!r}: the repo {repo!r} is not in the configured adapter_repos")
            return path
        try:
            resolved = Path(path).expanduser().resolve()
        except (ValueError, OSError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise BadRequest(f"invalid adapter path {path!r}: {e}") from None
        if not any(resolved.is_relative_to(d) for d in cfg.adapter_dirs):
            raise BadRequest(f"adapter path {path!r} is outside the configured adapter_dirs")
        return str(resolved)

    async def register(self, name: str, path: str, stats: str | None = None) -> dict:
        """A local adapter inside adapter_dirs, or an hf:// one from a repo adapter_repos allows (a Hub
        registration downloads: only from repos the operator named). The table keeps an hf:// reference as
        given, so a restart resolves it again (from the HF cache when offline). `stats`: a statistics file
        inside adapter_dirs, measured with this adapter, copied into the stats dir before the pool changes."""
        check_task_name(name)
        source = self.admitted(path)
        if stats is not None:
            self._refuse_registered(name)  # before the file is copied: a refused request changes nothing
            await self._add_stats(name, source, stats)
        async with self.lock:
            self._refuse_registered(name)
            tasks = self.server.tasks
            await self.change({name: source}, set(), lambda: tasks.put(name, source))
        await self.server.in_step()
        return self.describe(name)

    def _refuse_registered(self, name: str) -> None:
        if name in self.server.bases.adapters:
            raise Conflict(f"task {name!r} is already registered; unregister it first")

    async def _add_stats(self, name: str, source: str, stats: str) -> None:
        bases = self.server.bases
        if bases.stats_dir is None:
            raise BadRequest("this server keeps no statistics (no stats dir)")
        if is_hub_ref(stats):
            raise BadRequest(f"statistics {stats!r}: a local file inside the configured adapter_dirs, not hf://")
        try:
            measured = await asyncio.to_thread(TaskStats.load, self.admitted(stats), name)
        except StatsError as e:
            raise BadRequest(str(e)) from None
        if measured.task != name:
            raise BadRequest(f"statistics {stats!r} are task {measured.task!r}'s, not {name!r}'s")
        adapter = await asyncio.to_thread(lambda: load_adapter(adapter_dir(source), name))  # its digest
        if measured.adapter != adapter.digest:
            raise BadRequest(f"statistics {stats!r} were measured with another adapter than {source}")
        await asyncio.to_thread(bases.stats_dir.put, measured)

    async def unregister(self, name: str) -> None:
        async with self.lock:
            if name not in self.server.bases.adapters:
                raise UnknownTask(f"unknown task {name!r}")
            tasks = self.server.tasks
            await self.change({}, {name}, lambda: tasks.delete(name))
        await self.server.in_step()

    async def change(self, add: dict[str, str], remove: set[str], write=None) -> None:
        """Every pool change, under the pool's lock. While requests are served: the new adapters fetched (a
        Hub download), loaded, hashed and copied to the compose device (the new pool's shared basis is built
        on its first use: basis_store.py). Then drained: the new adapters loaded into vLLM, the change written
        to the store (`write`; one applied from another replica is there already), the new pool installed. A
        failure anywhere changes nothing."""
        s = self.server
        local = {n: await asyncio.to_thread(adapter_dir, src) for n, src in add.items()}
        stamps = {n: _stamp(p / WEIGHTS_NAME) for n, p in local.items()}
        loaded = {n: await asyncio.to_thread(load_adapter, p, n) for n, p in local.items()}
        pool = {n: a for n, a in s.bases.adapters.items() if n not in remove} | loaded
        prepared = await asyncio.to_thread(s.bases.prepare, pool)
        async with s.gate.exclusive(s.cfg.drain_timeout_s):  # drained, like a pin: docs/RELIABILITY.md
            table = s.models.lora_requests
            dropped = {n: table.pop(n) for n in remove if n in table}
            try:
                for n, path in local.items():
                    await self._load_plain(n, path)
                if write is not None:
                    await asyncio.to_thread(write)
                    s.store_sync.written("tasks")
            except BaseException:
                for n in local:
                    table.pop(n, None)
                table.update(dropped)
                raise
            s.bases.install(prepared)
            s.cache.clear()  # in a new shared basis every non-TA merge changes
        self.sources = {n: src for n, src in self.sources.items() if n not in remove} | add
        self.stamps = {n: st for n, st in self.stamps.items() if n not in remove} | stamps

    async def _load_plain(self, name: str, path: Path) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        request = LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path))
        result = await self.server.models.load_lora_adapter(request)
        if not isinstance(result, str):  # an ErrorResponse
            raise AdapterError(f"vLLM could not load {name!r}: {result.error.message}")

    def describe(self, name: str) -> dict:
        a = self.server.bases.adapters[name]
        return {
            "name": name,
            "model": f"{PREFIX}{name}",
            "path": a.path,
            "source": self.sources.get(name, a.path),  # as configured or registered: a path or hf://…
            "modules": len(a.modules),
            "ranks": sorted({m.rank for m in a.modules.values()}),
            "bytes": self.server.bases.task_nbytes(name),  # its factors on the compose device
            "stats": stats_summary(self.server.bases.stats_file(name)),  # for the data-aware merges
        }


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
