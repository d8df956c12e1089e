"""vLLM glue, loaded through entry points (pyproject.toml) when VLLM_PLUGINS names `knots_serve`:

- `register` (vllm.general_plugins, every vLLM process): the LoRA resolver, and the CPU LoRA-op fix.
- `KnotsEndpoint` (vllm.endpoint_plugins, API server): the admin and /v1/models routes, the request
  middleware, and the KnotsServer state.

Request path: the middleware reads the JSON body of /v1/chat/completions and /v1/completions; if it
selects a merge (`tasks:…`, a named merge, or a `knots` field) it composes it (once) and rewrites
`model` to the merge's canonical name; vLLM then finds no such LoRA and asks the resolver, which returns
the composed adapter's path; vLLM loads it and serves the request — streaming, templates, logprobs and
all — as for any LoRA.
"""

from __future__ import annotations

import json
import logging
import os

from ..adapters import AdapterError
from ..compose import MergeError
from . import lora_fix, metrics
from .server import KnotsServer, error_status

log = logging.getLogger("knots_serve")
SERVER: KnotsServer | None = None  # set in the API server process by KnotsEndpoint.init_state
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_BODY = 8 << 20


def register() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class KnotsResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            path = SERVER.resolve(lora_name) if SERVER else None
            # lora_int_id is a placeholder: vLLM assigns the real id
            return LoRARequest(lora_name, 1, str(path)) if path else None

    LoRAResolverRegistry.register_resolver("knots_serve", KnotsResolver())
    if lora_fix.apply():
        log.info("knots_serve: patched vLLM's CPU LoRA ops (slot -1 picked up the last LoRA)")


def openai_error(message: str, status: int) -> bytes:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "BadRequestError"}
    return json.dumps({"error": {"message": message, "type": kind.get(status, "BadRequestError"),
                                 "param": "model", "code": status}}).encode()


class KnotsMiddleware:
    """Pure ASGI: routes merge requests (see the module doc); everything else passes through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if not (SERVER and scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTED_PATHS):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY:
                return await respond(send, 413, openai_error(f"request body over {MAX_BODY} bytes", 413))
        body = b"".join(chunks)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None  # not JSON: vLLM answers that itself
        if isinstance(doc, dict):
            try:
                name = await SERVER.route(doc)
            except (MergeError, AdapterError) as e:
                status = error_status(e)
                metrics.ERRORS.labels(str(status)).inc()
                return await respond(send, status, openai_error(str(e), status))
            if name is not None:
                doc["model"] = name
                doc.pop("knots", None)
                body = json.dumps(doc).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, if any
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class KnotsEndpoint:
    name = "knots_serve"
    required_tasks = None

    def attach_router(self, app) -> None:
        from .api import router

        app.include_router(router)
        app.add_middleware(KnotsMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        global SERVER
        from .config import CONFIG_ENV, load_config

        cfg = load_config(os.environ[CONFIG_ENV])
        SERVER = state.knots = KnotsServer(cfg, state.openai_serving_models)
        log.info("knots_serve: %d tasks, basis ready", len(SERVER.composer.adapters))
