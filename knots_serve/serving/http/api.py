"""HTTP routes the plugin adds to vLLM's app: the admin API (task registry, composed merges, experiments,
recipes, pins) and a /v1/models that also lists every task as `tasks:NAME` and the named merges."""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import asdict

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ...compose import MergeError
from ..errors import ERRORS, BadRequest, Conflict, NotFound, Unavailable, error_response
from ..merges.names import recipe_model
from ..server import pins
from ..server.config import other_hosts
from ..server.hub import KnotsServer
from ..state.experiments import Experiment
from ..state.traffic import weight
from .auth import admin_refusal

router = APIRouter()


def server(request: Request) -> KnotsServer:
    return request.app.state.knots


def admin(request: Request, authorization: str | None = Header(None), x_admin_key: str | None = Header(None)):
    """Admin routes need the key from the env var named by `admin_key_env` (compared in constant time).
    (The middleware checks it first; this keeps each route safe on its own.)"""
    refused = admin_refusal(server(request).cfg.admin_key_env, authorization, x_admin_key)
    if refused:
        raise HTTPException(*refused)


class RegisterTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    path: str = Field(max_length=4096)
    stats: str | None = Field(None, max_length=4096, description="a statistics file (knots-serve stats) for it")


@router.get("/admin/tasks", dependencies=[Depends(admin)])
async def list_tasks(request: Request):
    """Each task (rank, modules, source, bytes of its factors) and the pool's shared basis: its fingerprint
    (changes with the pool), its bytes, and all that the pool holds on the compose device."""
    s = server(request)
    basis = {"fingerprint": s.bases.pool_id, "bytes": s.bases.shared_nbytes(), "resident_bytes": s.bases.nbytes()}
    return {"tasks": [s.describe(n) for n in sorted(s.bases.adapters)], "basis": basis}


@router.post("/admin/tasks", dependencies=[Depends(admin)], status_code=201)
async def register_task(body: RegisterTask, request: Request):
    try:
        return await server(request).register(body.name, body.path, body.stats)
    except ERRORS as e:
        return error_response(e)


@router.delete("/admin/tasks/{name}", dependencies=[Depends(admin)])
async def unregister_task(name: str, request: Request):
    try:
        await server(request).unregister(name)
    except ERRORS as e:
        return error_response(e)
    return {"removed": name}


@router.get("/admin/merges", dependencies=[Depends(admin)])
async def list_merges(request: Request):
    """What is cached (with hits, compose time, eviction priority, requests using it, and why: prewarmed
    for a recipe or for traffic, composed ahead and not used yet (speculative), or composed for a request),
    composing, pinned, and hot across the store."""
    s = server(request)
    c, why, now = s.cache, s.prewarm.why, weight()  # counts in the store are forward-decayed: traffic.py
    try:
        hot = await asyncio.to_thread(s.store.popular, 20)
    except MergeError as e:  # the store away: the rest still answers
        hot = str(e)
    return {
        "merges": [
            r | {"why": why.get(r["model"]) or ("speculative" if r["speculative"] else "request")} for r in c.describe()
        ],
        "composing": c.composing_now(),
        "pinned": s.pinned and s.pinned["model"],
        "hot": [{"model": m, "recent_requests": round(n / now, 2)} for m, n in hot] if isinstance(hot, list) else hot,
        "cache_bytes": c.cached_bytes(),
        "cache_limit": c.cache_bytes,
    }


@router.get("/admin/experiments", dependencies=[Depends(admin)])
async def list_experiments(request: Request):
    return {n: e.model_dump() for n, e in server(request).experiments.items()}


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise BadRequest(f"duplicate name(s) in the definition: {', '.join(twice)}")
    return dict(pairs)


async def _experiment_body(request: Request) -> dict:
    """The JSON body, parsed so that duplicate keys (two arms of one name) are an error, not a silent
    overwrite as in plain JSON parsing."""
    import json

    try:
        doc = json.loads(await request.body(), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


async def _define(request: Request, name: str, doc: dict, create: bool):
    from pydantic import ValidationError

    s = server(request)
    if create and name in s.experiments:
        raise Conflict(f"experiment {name!r} already exists (PUT /admin/experiments/{name} replaces it)")
    try:
        exp = Experiment.model_validate(doc)
    except ValidationError as e:
        raise BadRequest(
            "invalid experiment: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        ) from None
    await s.put_experiment(name, exp)
    return {name: exp.model_dump()}


@router.post("/admin/experiments", dependencies=[Depends(admin)], status_code=201)
async def create_experiment(request: Request):
    """Body: {"name": ..., "arms": {ARM: {"model": ..., "weight": ...}}}."""
    try:
        doc = await _experiment_body(request)
        name = doc.pop("name", None)
        if not isinstance(name, str) or not name:
            raise BadRequest("the body needs a 'name'")
        return await _define(request, name, doc, create=True)
    except ERRORS as e:
        return error_response(e)


@router.put("/admin/experiments/{name}", dependencies=[Depends(admin)])
async def put_experiment(name: str, request: Request):
    """Create or replace. Body: {"arms": {ARM: {"model": ..., "weight": ...}}}."""
    try:
        return await _define(request, name, await _experiment_body(request), create=False)
    except ERRORS as e:
        return error_response(e)


@router.patch("/admin/experiments/{name}/weights", dependencies=[Depends(admin)])
async def set_weights(name: str, weights: dict[str, float], request: Request):
    try:
        return {name: (await server(request).set_weights(name, weights)).model_dump()}
    except ValueError as e:  # MergeError (a ServeError) or pydantic's, for a weight out of range
        return error_response(e if isinstance(e, MergeError) else BadRequest(str(e)))


@router.delete("/admin/experiments/{name}", dependencies=[Depends(admin)])
async def delete_experiment(name: str, request: Request):
    try:
        await server(request).delete_experiment(name)
    except ERRORS as e:
        return error_response(e)
    return {"removed": name}


@router.get("/admin/experiments/{name}/report", dependencies=[Depends(admin)])
async def report(name: str, request: Request, history: bool = False):
    """Per arm: served, errors, latency and TTFT quantiles, mean feedback with its 95% interval; whether
    promote would succeed now (and why not); with ?history=true, this replica's earlier reports."""
    s = server(request)
    if name not in s.experiments:
        return error_response(NotFound(f"unknown experiment {name!r}"))
    exp = s.experiments[name]
    try:
        arms = await asyncio.to_thread(s.outcomes.report, name, sorted(exp.arms))
    except ERRORS as e:  # the store away: 503
        return error_response(e)
    promotable = s.ab.promotable(name, arms)
    for arm, row in arms.items():
        row |= {"model": exp.arms[arm].model, "weight": exp.arms[arm].weight}
    doc = {"experiment": name, "arms": arms, "promotable": promotable}
    return doc | {"history": s.outcomes.history(name)} if history else doc


@router.post("/admin/experiments/{name}/promote", dependencies=[Depends(admin)])
async def promote(name: str, request: Request):
    """The winning arm as its subset's recipe, once its feedback separates (409 saying why not otherwise)."""
    try:
        return await server(request).promote(name)
    except ERRORS as e:
        return error_response(e)


@router.get("/admin/recipes", dependencies=[Depends(admin)])
async def list_recipes(request: Request):
    """The recipes served for `tasks:A+B` (as in the store, with the model each serves), the rule fitted for
    each subset size the tuned recipes cover, and why they were not reloaded, if they were not."""
    s = server(request)
    book = s.book
    sizes = sorted({len(r.tasks) for r in book.tuned})
    return {
        "path": s.store.where("recipes"),
        "recipes": [asdict(r) | {"model": recipe_model(r)} for _, r in sorted(book.recipes.items())],
        "rule": {n: {"method": c.method, "params": c.params} for n, c in ((n, book.rule(n)) for n in sizes)},
        "error": s.recipes_error,
    }


@router.get("/admin/recipes/report", dependencies=[Depends(admin)])
async def tuning_report(request: Request):
    """The report of the last `knots-serve tune` into this server's state_dir: its markdown, and its picture
    as a data URL (null for what is not there)."""
    where = server(request).cfg.tune_report_dir

    def read():
        md, png = where / "report.md", where / "report.png"
        picture = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() if png.exists() else None
        return {"path": str(where), "markdown": md.read_text() if md.exists() else None, "picture": picture}

    try:
        return await asyncio.to_thread(read)
    except OSError as e:
        return error_response(Unavailable(f"cannot read the tuning report in {where}: {e}"))


@router.get("/admin/store", dependencies=[Depends(admin)])
async def show_store(request: Request):
    """Where the shared state is, how often this server polls it, why its last sync failed (if it did), which
    API server process answers (with several, group.py), and the engine: whether it spans hosts (its workers or
    data-parallel engines) and whether it is dead (a worker gone, on this host or another; vLLM's /health: 503)."""
    s = server(request)
    group = {"index": s.group.index, "of": s.group.count} if s.group else {"index": 0, "of": 1}
    dead = s.engine is not None and s.engine.errored
    return {
        "store": s.store.location,
        "poll_s": s.cfg.store_poll_s,
        "error": s.store_sync.error,
        "api_server": group | {"pid": os.getpid()},
        "engine": {
            "other_hosts": other_hosts(s.cfg.vllm_args) is not None,
            "dead": dead,
            "error": str(s.engine.dead_error) if dead else None,
        },
    }


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=256, description="the id of a response served by an experiment arm")
    score: float = Field(ge=-1e6, le=1e6, allow_inf_nan=False)


@router.post("/v1/feedback")
async def feedback(body: Feedback, request: Request):
    """One score per response id: the same score again answers 200 with "recorded": false (a safe retry),
    another score 409."""
    try:
        experiment, arm, recorded = await asyncio.to_thread(server(request).outcomes.record, body.id, body.score)
    except KeyError:
        return error_response(NotFound(f"no experiment response with id {body.id!r} (or it is too old)"))
    except ERRORS as e:
        return error_response(e)
    return {"id": body.id, "experiment": experiment, "arm": arm, "recorded": recorded}


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=4096, description="a merge: tasks:A+B[@METHOD][?…] or a named merge")


@router.get("/admin/pin", dependencies=[Depends(admin)])
async def show_pin(request: Request):
    """The pinned merge, and the pin or unpin under way (its phase, and the requests its drain waits for)."""
    s = server(request)
    return {"pinned": s.pinned, "pending": pins.pending(s)}


@router.post("/admin/pin", dependencies=[Depends(admin)])
async def pin(body: Pin, request: Request):
    try:
        return {"pinned": await pins.pin(server(request), body.model)}
    except ERRORS as e:
        return error_response(e)


@router.delete("/admin/pin", dependencies=[Depends(admin)])
async def unpin(request: Request):
    try:
        return await pins.unpin(server(request))
    except ERRORS as e:
        return error_response(e)


@router.get("/v1/models")
async def list_models(request: Request):
    listed = await request.app.state.openai_serving_models.show_available_models()
    parent = listed.data[0].id if listed.data else None
    have = {card.id for card in listed.data}
    extra = [
        {
            "id": i,
            "object": "model",
            "owned_by": "knots-serve",
            "root": i,
            "parent": parent,
            "created": listed.data[0].created if listed.data else 0,
            "permission": [],
        }
        for i in server(request).model_ids()
        if i not in have
    ]
    doc = listed.model_dump()
    doc["data"] += extra
    return JSONResponse(doc)
