"""HTTP routes the plugin adds to vLLM's app: the admin API (task registry, composed merges) and a
/v1/models that also lists every task as `tasks:NAME` and the named merges."""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..adapters import AdapterError
from ..compose import MergeError
from .server import KnotsServer, error_status

router = APIRouter()


def server(request: Request) -> KnotsServer:
    return request.app.state.knots


def admin(request: Request, authorization: str | None = Header(None), x_admin_key: str | None = Header(None)):
    """Admin routes need the key from the env var named by `admin_key_env` (compared in constant time)."""
    cfg = server(request).cfg
    expected = os.environ.get(cfg.admin_key_env)
    if not expected:
        raise HTTPException(403, f"admin API disabled: set {cfg.admin_key_env} for the server")
    given = x_admin_key or (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong admin key (Authorization: Bearer KEY or X-Admin-Key)")


class RegisterTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    path: str = Field(max_length=4096)


def _error(e: Exception) -> JSONResponse:
    status = error_status(e)
    return JSONResponse({"error": {"message": str(e), "type": "BadRequestError" if status == 400 else
                                   "NotFoundError", "code": status}}, status_code=status)


@router.get("/admin/tasks", dependencies=[Depends(admin)])
async def list_tasks(request: Request):
    s = server(request)
    return {"tasks": [s.describe(n) for n in sorted(s.composer.adapters)]}


@router.post("/admin/tasks", dependencies=[Depends(admin)], status_code=201)
async def register_task(body: RegisterTask, request: Request):
    try:
        return await server(request).register(body.name, body.path)
    except (MergeError, AdapterError) as e:
        return _error(e)


@router.delete("/admin/tasks/{name}", dependencies=[Depends(admin)])
async def unregister_task(name: str, request: Request):
    try:
        await server(request).unregister(name)
    except (MergeError, AdapterError) as e:
        return _error(e)
    return {"removed": name}


@router.get("/admin/merges", dependencies=[Depends(admin)])
async def list_merges(request: Request):
    c = server(request).composer
    return {"merges": [{"model": m.name, "rank": m.rank, "bytes": m.nbytes} for m in c.cached()],
            "cache_bytes": c.cached_bytes(), "cache_limit": c.cache_bytes}


@router.get("/v1/models")
async def list_models(request: Request):
    listed = await request.app.state.openai_serving_models.show_available_models()
    parent = listed.data[0].id if listed.data else None
    have = {card.id for card in listed.data}
    extra = [{"id": i, "object": "model", "owned_by": "knots-serve", "root": i, "parent": parent,
              "created": listed.data[0].created if listed.data else 0, "permission": []}
             for i in server(request).model_ids() if i not in have]
    doc = listed.model_dump()
    doc["data"] += extra
    return JSONResponse(doc)
