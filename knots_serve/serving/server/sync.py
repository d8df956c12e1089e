"""What other replicas change in the store (store.py), applied to this server: every `store_poll_s` the store's
versions are read, and each kind that changed since is applied (docs/DEPLOY.md, "Several hosts"):

- tasks: the table read again and the pool changed through the server's one path for pool changes
  (Pool.change, as an admin registration but without writing the store): the source checked
  against this replica's adapter_dirs / adapter_repos, the adapter loaded (its path must exist on this host),
  the new pool's basis built while requests are served, then drained, loaded into vLLM and installed;
- experiments: the table read again and the server's dict swapped;
- recipes: read again; recipes that do not parse keep the ones served before (and say why).

Each poll also adds the merges this server served since the last one to the store's traffic counts
(state/traffic.py), which the prewarm of servers that start later reads.

Tasks first: an experiment or a recipe may name a task registered with it. A kind counts as applied only once
it was, so a failure (the store away, an adapter missing on this host) is retried at the next poll, logged
once, and shown by GET /admin/store.
"""

from __future__ import annotations

import asyncio
import logging

from ...compose import MergeError
from ..state.experiments import Experiment
from ..state.store import KINDS, StoreUnavailable

log = logging.getLogger("vllm.knots_serve")
STALE = object()  # a version no store reports: the kind is read again at the next poll


class StoreSync:
    def __init__(self, server):
        self.server = server
        # read first, before the server reads its state: a change made meanwhile is applied at the first poll
        self.seen = server.store.versions()
        self.error: str | None = None
        self._task: asyncio.Task | None = None

    def written(self, kind: str) -> None:
        """This server wrote `kind` to the store itself: read it again at the next poll. The files store's
        versions are file stamps, so a file written here and removed (or restored) by hand before the next poll
        would otherwise look unchanged, and this server would keep serving what it wrote."""
        self.seen[kind] = STALE

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.server.cfg.store_poll_s)
            try:
                await self.apply()
                await asyncio.to_thread(self.server.traffic.flush, self.server.store)
            except Exception as e:  # the store away, an adapter missing here: serve on, retry at the next poll
                if str(e) != self.error:
                    log.warning("knots_serve: not in sync with the store %s: %s", self.server.store.location, e)
                self.error = str(e)
            else:
                self.error = None

    async def apply(self) -> None:
        """Apply what changed in the store since the last time (what each poll does)."""
        versions = await asyncio.to_thread(self.server.store.versions)
        apply = {"tasks": self._tasks, "experiments": self._experiments, "recipes": self._recipes}
        for kind in KINDS:
            if versions.get(kind) != self.seen.get(kind):
                await apply[kind]()
                self.seen[kind] = versions.get(kind)

    async def _tasks(self) -> None:
        s = self.server
        async with s.pool.lock:
            await asyncio.to_thread(s.tasks.reload)
            want = s.tasks.items()
            remove = {n for n in s.bases.adapters if want.get(n) != s.pool.sources.get(n)}
            add = {n: src for n, src in want.items() if n not in s.bases.adapters or n in remove}
            for src in add.values():
                s.pool.admitted(src)  # this replica's adapter_dirs and adapter_repos bound what the store may add
            if add or remove:
                log.info("knots_serve: from the store: tasks %s added, %s removed", sorted(add), sorted(remove))
                await s.pool.change(add, remove)

    async def _experiments(self) -> None:
        s = self.server
        async with s.ab.lock:
            await asyncio.to_thread(s.experiment_store.reload)
            s.experiments = {n: Experiment.model_validate(e) for n, e in s.experiment_store.items().items()}

    async def _recipes(self) -> None:
        s = self.server
        try:
            s.book, s.recipes_error = await asyncio.to_thread(s.store.recipes), None
        except StoreUnavailable:
            raise
        except MergeError as e:  # recipes that do not parse (a bad write by hand): keep serving the ones before
            s.recipes_error = str(e)
            log.warning("knots_serve: keeping the recipes served before: %s", e)
