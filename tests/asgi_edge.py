"""The HTTP edge without an engine: the real KnotsServer and middleware driven over ASGI, with vLLM's
routes replaced by `app` below and vLLM's LoRA table by a plain object. For what the tiny model's engine
finishes too fast to hold (a compose in flight, a request that never ends)."""

import asyncio
import json
import types

import httpx
from fastapi import FastAPI

from knots_serve.serving.http.api import router
from knots_serve.serving.http.middleware import KnotsMiddleware
from knots_serve.serving.server.config import load_config
from knots_serve.serving.server.hub import KnotsServer


class Engine:
    """Where vLLM's routes would be: 200 with a response id once a request reaches it, or held until `release`
    is set."""

    def __init__(self):
        self.release = asyncio.Event()
        self.release.set()
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send):
        body = (await receive()).get("body", b"")
        self.seen.append({"path": scope["path"], "body": json.loads(body) if body else None})
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"id": f"resp-{len(self.seen)}"}).encode()})


def make_server(tmp_path, tiny_adapters, **settings) -> KnotsServer:
    """A KnotsServer on the tiny adapters (inside a running event loop), installed for the middleware."""
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "model": str(tmp_path),
                "served_model_name": "tiny",
                "tasks": {n: str(p) for n, p in tiny_adapters.items()},
                "cache_dir": str(tmp_path / "cache"),
                "state_dir": str(tmp_path / "state"),
                "compose_device": "cpu",
                "adapter_dirs": [str(tmp_path)],
            }
            | settings
        )
    )

    async def load_lora_adapter(request):  # vLLM's OpenAIServingModels.load_lora_adapter: the name on success
        return request.lora_name

    server = KnotsServer(
        load_config(path), types.SimpleNamespace(lora_requests={}, load_lora_adapter=load_lora_adapter)
    )
    KnotsMiddleware.server = server
    return server


async def call(mw, model=None, path="/v1/chat/completions", body=None, headers=(), client=("127.0.0.1", 1)):
    """One request through the middleware: (status, headers, JSON body)."""
    sent = []
    body = body if body is not None else {"model": model, "messages": [{"role": "user", "content": "one"}]}
    raw = json.dumps(body).encode() if isinstance(body, dict) else body

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers), "client": client}
    await mw(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])


async def admin(server, method, path, json=None, key=None):
    """One call to the admin routes (api.py) of `server`, with `key` as the bearer token: (status, JSON body)."""
    app = FastAPI()
    app.include_router(router)
    app.state.knots = server
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://server") as client:
        r = await client.request(method, path, json=json, headers={"authorization": f"Bearer {key}"})
    return r.status_code, r.json()
