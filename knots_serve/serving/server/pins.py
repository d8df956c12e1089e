"""Pinning through the admin API (POST/DELETE /admin/pin): a merge written into the engine's base weights on
every worker of every data-parallel engine (pinning.py does the write in the workers). The merge is composed
and prepared while requests are served; only the write drains them — those of every API server process of
this vLLM (group.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from pathlib import Path

from ...adapters import save_factors
from ...methods import full_rank
from .. import metrics
from ..engine import fleet_files
from ..errors import BadRequest, Conflict, NotFound, Unavailable

PIN_WAIT_S = 600  # beyond the drain: how long a pin waits for another one (its prepare) to end


async def pin(server, model: str) -> dict:
    if not server.cfg.pinning:
        raise Conflict("pinning is disabled in this server's config (pinning: false)", param=None)
    sel = server.selection({"model": model})
    if sel is None or sel.spec is None:
        raise BadRequest(f"{model!r} is not a merge: pin a tasks:A+B[@METHOD] string or a named merge")
    server.bases.check(sel.tasks)
    t0 = time.perf_counter()
    fleet = server.cache.fleet
    if full_rank(sel.spec.method):  # a dense ΔW: composed where the weights are
        if fleet.required:
            raise BadRequest(
                f"{model!r} is a dense-space merge, composed by every worker from the pool's basis file, which the "
                f"workers on other nodes cannot read: pin knots-{sel.spec.method} (its KnOTS-basis form) instead"
            )
        basis = await asyncio.to_thread(server.bases.basis_file_for, sel, server.cache.cache_dir)
        args = ("basis", str(basis), json.dumps(dataclasses.asdict(sel.spec)))
    else:
        # named pin-TOKEN-SERIAL: on several nodes the other workers fetch it from the fleet by pin-TOKEN
        path = server.cache.cache_dir / f"pin-{uuid.uuid4().hex}-{next(server.pin_serial)}.safetensors"
        lora = await server.loop.run_in_executor(server.router.compose_pool, server.bases.merge, sel)
        await asyncio.to_thread(save_factors, lora, path)
        if fleet.required:
            await asyncio.to_thread(ship, fleet, path)
        args = ("factors", str(path))
    engine = server.engine
    try:
        async with one_at_a_time(server):
            stage(server, model, "preparing")
            try:
                prepared = await rpc(engine, "knots_prepare", args)
            except Exception as e:  # the weights are untouched: nothing to restore
                raise Unavailable(f"preparing the pin of {model!r} failed, nothing changed: {e}") from None
            t1 = time.perf_counter()
            stage(server, model, "draining")
            async with drained(server):
                t2 = time.perf_counter()
                stage(server, model, "swapping")
                try:
                    written = await rpc(engine, "knots_pin")
                except Exception as e:  # back to the base weights on every worker: never half a merge
                    await rpc(engine, "knots_unpin")
                    server.pinned = None
                    raise Unavailable(f"pinning {model!r} failed, base weights restored: {e}", param=None) from None
                finally:
                    await engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
                pinned = server.pinned = {
                    "model": sel.canonical,
                    "requested": model,
                    "prepare_s": t1 - t0,
                    "drain_s": t2 - t1,
                    "swap_s": time.perf_counter() - t2,
                    "workers": [p | w for p, w in zip(prepared, written)],
                }
                for phase in ("prepare", "drain", "swap"):
                    metrics.PIN_SECONDS.labels(phase).observe(pinned[f"{phase}_s"])
    finally:
        if args[0] == "factors":
            Path(args[1]).unlink(missing_ok=True)
    return pinned


def ship(fleet, path: Path) -> None:
    """A pin's factors, published for the workers on other nodes (engine/fleet_files.py); 503 if they cannot be
    (the file removed: the pin changes nothing)."""
    size = path.stat().st_size
    try:
        if not fleet.publish(fleet_files.key_of(path), {path.name: path.read_bytes()}):
            raise Unavailable(
                f"the pin's factors ({size / 2**20:.1f} MiB) cannot be sent to the other nodes: above "
                "fleet_inline_bytes and no fleet_dir"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def unpin(server) -> dict:
    async with one_at_a_time(server):
        if server.pinned is None:
            raise NotFound("no merge is pinned")
        stage(server, None, "draining")
        t0 = time.perf_counter()
        async with drained(server):
            stage(server, None, "swapping")
            t1 = time.perf_counter()
            results = await rpc(server.engine, "knots_unpin")
            await server.engine.reset_prefix_cache()
            was, server.pinned = server.pinned, None
    swap_s = time.perf_counter() - t1
    metrics.PIN_SECONDS.labels("drain").observe(t1 - t0)
    metrics.PIN_SECONDS.labels("swap").observe(swap_s)
    return {"unpinned": was["model"], "drain_s": t1 - t0, "swap_s": swap_s, "workers": results}


def stage(server, model: str | None, phase: str) -> None:
    """What a pin (model) or an unpin (None) is doing now, for GET /admin/pin: preparing (the workers load
    it), draining (requests in flight finish, new ones wait) or swapping (the weights)."""
    server.pin_pending = {"model": model, "phase": phase, "since": time.time()}


def pending(server) -> dict | None:
    """The pin or unpin under way, with the requests the drain still waits for."""
    p = server.pin_pending
    return p and p | {"in_flight": server.gate.inside}


@contextlib.asynccontextmanager
async def one_at_a_time(server):
    """One pin or unpin at a time, in this API server and in its group: knots_prepare leaves its merge in the
    workers for the knots_pin that follows, and another pin in between would change what is written."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(server.pin_lock)
        if server.group is not None:
            await stack.enter_async_context(server.group.swap_lock(server.cfg.drain_timeout_s + PIN_WAIT_S))
        try:
            yield
        finally:
            server.pin_pending = None  # what the pin or unpin was doing (stage) ends with it


@contextlib.asynccontextmanager
async def drained(server):
    """No request in flight and none let in, in this API server and in every other one of the group, which
    learns the pin state the block leaves when it is released."""
    timeout = server.cfg.drain_timeout_s
    async with contextlib.AsyncExitStack() as stack:
        if server.group is not None:
            await stack.enter_async_context(server.group.drained(timeout, lambda: server.pinned))
        await stack.enter_async_context(server.gate.exclusive(timeout))
        yield


async def rpc(engine, method: str, args: tuple = ()) -> list:
    """A PinWorker method on every worker of every engine, their answers in order. vLLM's own collective_rpc
    runs it on every data-parallel engine but answers with the first engine's workers only."""
    core = engine.engine_core
    per_engine = await core.call_utility_all_async("collective_rpc", method, None, args, None)
    return [answer for answers in per_engine for answer in answers]
