"""Warm start: when a server starts (a restart, a new replica or API server process), it composes in the
background the merges it is likely to be asked for first — each recipe's merge, then the `prewarm` merges
most requested recently across the deployment (the store's traffic counts, state/traffic.py) — one at a
time in the compose pool, and each only once the server has been idle for QUIET_S (no request in flight,
nothing composing): a prewarm compose shares the requests' CPU (or GPU), so it yields to them, and
readiness is not delayed. A merge that fails (a task since unregistered, a merge no longer served per
request) is skipped and logged. What it composed, and why, shows in GET /admin/merges."""

from __future__ import annotations

import asyncio
import logging

from ...adapters import AdapterError
from ...compose import MergeError
from ..merges.names import check_per_request, recipe_model

log = logging.getLogger("vllm.knots_serve")
QUIET_S, POLL_S = 0.2, 0.05


class Background:
    """A part of the server that runs one task in the background (`run`) when its setting is on (`on`)."""

    def __init__(self, server):
        self.server = server
        self.task: asyncio.Task | None = None

    def on(self) -> bool:
        raise NotImplementedError

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self.on():
            self.task = self.server.loop.create_task(self.run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Prewarm(Background):
    def __init__(self, server):
        super().__init__(server)
        self.why: dict[str, str] = {}  # canonical name -> "recipe" | "traffic": what this server prewarmed

    def on(self) -> bool:
        return bool(self.server.cfg.prewarm)

    async def wanted(self) -> list[tuple[str, str]]:
        """(model, why) in order: the recipes' merges, then the most requested merges."""
        s = self.server
        recipes = [(recipe_model(r), "recipe") for r in s.book.recipes.values()]
        popular = await asyncio.to_thread(s.store.popular, s.cfg.prewarm)
        return recipes + [(model, "traffic") for model, _ in popular]

    async def run(self) -> None:
        s = self.server
        try:
            wanted = await self.wanted()
        except MergeError as e:  # the store away: start cold
            log.warning("knots_serve: prewarm skipped: %s", e)
            return
        done = 0
        for model, why in wanted:
            try:
                sel = s.router.selection({"model": model})
                if sel is None or sel.spec is None or sel.canonical in self.why:
                    continue
                check_per_request(sel)
                await self.idle()
                await s.loop.run_in_executor(s.router.compose_pool, s.cache.get, sel)
            except (MergeError, AdapterError) as e:
                log.info("knots_serve: prewarm of %s skipped: %s", model, e)
                continue
            self.why[sel.canonical] = why
            done += 1
        log.info("knots_serve: prewarmed %d merges (%d wanted)", done, len(wanted))

    async def idle(self) -> None:
        """Returns once no request has been in flight and nothing composing for QUIET_S."""
        s, quiet = self.server, 0.0
        while quiet < QUIET_S:
            await asyncio.sleep(POLL_S)
            quiet = 0.0 if s.gate.inside or s.cache.composing_now() else quiet + POLL_S
