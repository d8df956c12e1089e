"""Request routing: which model vLLM serves a completion request. A plain model passes; an experiment gets its
arm; a merge is composed first (once: the composed-adapter cache, in this server's compose pool, within the
client's rate of new merges) and the request is rewritten to the merge's name, which vLLM's LoRA resolver
(plugin.py) maps to the composed files while the request holds them."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import metrics
from ..errors import BadRequest
from ..merges.adapter_cache import Composed
from ..merges.basis_store import UnknownTask
from ..merges.names import PREFIX, Selection, check_per_request, parse_field, parse_model
from ..state.experiments import assign
from .client_names import ClientNames
from .config import ServeConfig
from .limits import RateLimit


@dataclass(frozen=True)
class Route:
    """Where a request goes: `model` replaces the body's model (None: leave it); for an experiment,
    which one and which arm."""

    model: str | None
    experiment: str | None = None
    arm: str | None = None
    held: Composed | None = None  # the composed merge this request uses: release it when the response is done


class Router:
    def __init__(self, server):
        self.server = server
        cfg = server.cfg
        self.new_merges = RateLimit(cfg.new_merge_rate, cfg.new_merge_burst)
        self.client_names = ClientNames()  # what vLLM's lora_requests_info lists each LoRA as (plugin.py)
        # composes run here, never in the event loop's default executor: a queue of composes must not
        # hold up cache hits or anything else the server runs in threads
        self.compose_pool = ThreadPoolExecutor(cfg.compose_workers + cfg.compose_pending, "knots-compose")

    def selection(self, body: dict) -> Selection | None:
        """The merge a request body asks for, or None when it names a plain model (base, adapter)."""
        choose, merges = self.server.ab.choose, self.server.cfg.merges
        if "knots" in body:
            return parse_field(body["knots"], choose)
        model = body.get("model")
        if not isinstance(model, str):
            return None
        if model in merges:
            return parse_model(merges[model], choose)
        if model.startswith(PREFIX):
            return parse_model(model, choose)
        return None

    def selects_merge(self, body: dict) -> bool:
        """Does a request body name something only the merge routing serves (a merge, an experiment, a task
        as tasks:NAME, a `knots` field)? Such bodies never reach vLLM unrouted (middleware.py)."""
        model = body.get("model")
        return "knots" in body or (
            isinstance(model, str)
            and (model.startswith(PREFIX) or model in self.server.cfg.merges or model in self.server.experiments)
        )

    async def route(self, body: dict, user: str | None, forced_arm: str | None, client: str) -> Route:
        """Where vLLM should serve the request (composing a merge first if needed; `client` is who
        asks, for the rate of new merges). Raises a ServeError (errors.py)."""
        s = self.server
        sent = model = body.get("model")
        experiment, arm, held = None, None, None
        if "knots" not in body and isinstance(model, str) and model in s.experiments:
            experiment, exp = model, s.experiments[model]
            if forced_arm is not None and forced_arm not in exp.arms:
                raise BadRequest(f"experiment {experiment!r} has no arm {forced_arm!r}: {', '.join(sorted(exp.arms))}")
            user = body.get("user") if isinstance(body.get("user"), str) else user
            arm = forced_arm or assign(experiment, exp, user)
            model = exp.arms[arm].model
            body = {"model": model}
        sel = self.selection(body)
        if sel is None:
            name = model if experiment else None  # the base or a plain adapter: vLLM's own names
            if model in s.bases.adapters:
                s.pool.check_files(model)
        elif sel.spec is None:  # tasks:A is A's own adapter, served under its plain name
            if sel.tasks[0] not in s.bases.adapters:
                raise UnknownTask(f"unknown task {sel.tasks[0]!r}; known: {', '.join(sorted(s.bases.adapters))}")
            name = sel.tasks[0]
            s.pool.check_files(name)
        elif s.pinned and sel.canonical == s.pinned["model"]:
            name = s.cfg.base_name  # the merge is in the base weights: no LoRA
        else:
            held = await self._hold(sel, client)
            name = held.name
            s.traffic.count(name)
            known = s.models.lora_requests.get(name)
            if known is not None and known.lora_path != str(held.path):  # an older compose of this merge:
                del s.models.lora_requests[name]  # vLLM asks the resolver, which gives this request's files
        # a bounded label set: per-request merges by method and subset size, never by their parameters
        label = experiment or (
            model if model in s.cfg.merges else f"merge/{len(sel.tasks)}/{sel.spec.method}" if held else name
        )
        if label:
            metrics.REQUESTS.labels(label).inc()
        if name and name != s.cfg.base_name and isinstance(sent, str):  # a LoRA: the base is never listed
            self.client_names.sent(name, sent)
        return Route(name, experiment, arm, held)

    async def _hold(self, sel: Selection, client: str):
        """cache.get(sel, hold=True): a cached merge at once, a new one in the compose pool (charged to the
        client's rate of new merges only if this request starts its compose); if this request is cancelled
        meanwhile, the hold taken by the pool's thread is released when it ends (never leaked)."""
        cache = self.server.cache
        cached = cache.hold_cached(sel)
        if cached is not None:
            return cached
        get = functools.partial(cache.get, sel, True, lambda: self.new_merges.take(client))
        job = asyncio.ensure_future(self.server.loop.run_in_executor(self.compose_pool, get))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or cache.release(j.result()))
            raise

    def resolve(self, name: str) -> Path | None:
        """For the vLLM resolver: where a routed merge's adapter is — only while a request holds it, so
        vLLM never loads a merge the middleware has not routed (and held) for that request."""
        composed = self.server.cache.held(name)
        return composed.path if composed else None

    def forget(self, c: Composed) -> None:
        """Before a composed merge's files are deleted: drop its name from vLLM's LoRA table if it points
        there, so vLLM never tries to load a deleted path (a failed load kills vLLM's engine). On the event
        loop, which is where vLLM reads the table; the caller waits."""
        loop, table = self.server.loop, self.server.models.lora_requests

        def forget():
            known = table.get(c.name)
            if known is not None and known.lora_path == str(c.path):
                del table[c.name]

        async def on_the_loop():
            forget()

        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            forget()
        else:
            asyncio.run_coroutine_threadsafe(on_the_loop(), loop).result(60)


def check_model(model: str, cfg: ServeConfig, tasks, choose) -> None:
    """Can a server with this config, these tasks and this chooser (names.Chooser) serve `model`? (For
    experiment arms; composes nothing.) Raises BadRequest / NotFound."""
    if model == cfg.base_name or model in tasks or model in cfg.merges:
        return
    if not model.startswith(PREFIX):
        raise UnknownTask(f"unknown model {model!r}")
    sel = parse_model(model, choose)
    unknown = [t for t in sel.tasks if t not in tasks]
    if unknown:
        raise UnknownTask(f"unknown task(s): {', '.join(unknown)}")
    check_per_request(sel)  # an arm is served per request
