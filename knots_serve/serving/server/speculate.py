"""Speculative compose: while the server is idle, compose the merges most likely to be asked for next, so
that their first request finds them cached.

Candidates, best first (`candidates`): the merges most requested across the deployment (the store's
traffic counts, state/traffic.py) that are not cached here, then pairs of the hottest tasks — a task's heat
is the summed count of the requested merges that hold it — in the method those requests used most. Every
ROUND_S, up to `speculate` of them are composed, one at a time, each only once the server has been idle
for QUIET_S (prewarm.py): a speculative compose yields to requests. A speculative merge enters the cache
with no hit (cache_policy.py), so it is the first to go when room is needed and never displaces a merge a
client asked for; a round stops while the cache has no room for a merge of the usual size. What came of
it is counted in knots_speculative{outcome}: composed, hit (a request used it: a compose saved) and wasted
(evicted before any request did); GET /admin/merges shows them as "speculative" until first used.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import Counter
from collections.abc import Callable

from ...adapters import AdapterError
from ...compose import MergeError
from ..merges.names import Selection, check_per_request
from .prewarm import Background

log = logging.getLogger("vllm.knots_serve")
ROUND_S = 1.0
POPULAR = 64  # merges read from the traffic counts per round
HOT_TASKS = 8  # the hottest tasks whose pairs are candidates: 28 pairs


def candidates(popular: list[tuple[str, float]], selection: Callable[[str], Selection | None]) -> list[Selection]:
    """Merges to compose ahead, best first: the requested merges by count, then the hottest tasks' pairs by
    the product of their heats, in the requests' most used method (duplicates removed by canonical name). A
    counted name that no longer parses (a method since removed) is skipped, not the round."""

    def merge(model: str) -> Selection | None:
        try:
            sel = selection(model)
        except MergeError:
            return None
        return sel if sel is not None and sel.spec is not None else None

    heat, methods, out = Counter(), Counter(), {}  # out: canonical name -> selection, in order
    for model, count in popular:
        sel = merge(model)
        if sel is None:
            continue
        out.setdefault(sel.canonical, sel)
        methods[sel.spec.method] += count
        for t in sel.tasks:
            heat[t] += count
    if methods:
        method = methods.most_common(1)[0][0]
        hot = [t for t, _ in heat.most_common(HOT_TASKS)]
        for a, b in sorted(itertools.combinations(hot, 2), key=lambda p: -heat[p[0]] * heat[p[1]]):
            sel = merge(f"tasks:{a}+{b}@{method}")
            if sel is not None:
                out.setdefault(sel.canonical, sel)
    return list(out.values())


class Speculate(Background):
    def on(self) -> bool:
        return bool(self.server.cfg.speculate)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(ROUND_S)
            try:
                await self.round()
            except MergeError as e:  # the store away: try again next round
                log.info("knots_serve: speculative compose paused: %s", e)

    async def round(self) -> int:
        """One round: up to `speculate` candidates composed. Returns how many."""
        s, done = self.server, 0
        popular = await asyncio.to_thread(s.store.popular, POPULAR)
        for sel in candidates(popular, lambda m: s.router.selection({"model": m})):
            if done >= s.cfg.speculate or not s.cache.room_for_one():
                break
            if s.cache.knows(sel.canonical) or (s.pinned and s.pinned["model"] == sel.canonical):
                continue
            try:
                check_per_request(sel)
                await s.prewarm.idle()
                get = functools.partial(s.cache.get, sel, speculative=True)
                await s.loop.run_in_executor(s.router.compose_pool, get)
            except (MergeError, AdapterError) as e:  # a task since unregistered, a merge not served per request
                log.info("knots_serve: speculative compose of %s skipped: %s", sel.canonical, e)
                continue
            done += 1
        return done
