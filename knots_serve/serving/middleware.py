"""The request middleware (pure ASGI, inside vLLM's app): routes merge and experiment requests before
vLLM parses them, and labels experiment responses with their arm (header + JSON field) and metrics."""

from __future__ import annotations

import json
import time

from ..adapters import AdapterError
from ..compose import MergeError
from . import metrics
from .auth import refusal
from .server import ERROR_TYPES, KnotsServer, Route, error_status

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_BODY = 8 << 20
USER_HEADER, ARM_HEADER, EXPERIMENT_HEADER = b"x-knots-user", b"x-knots-arm", b"x-knots-experiment"


def openai_error(message: str, status: int, param: str | None = "model") -> bytes:
    return json.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"),
                                 "param": param, "code": status}}).encode()


async def respond(send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class KnotsMiddleware:
    server: KnotsServer | None = None  # set by the endpoint plugin once the server state exists

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        server = KnotsMiddleware.server
        if server and scope["type"] == "http":
            refused = refusal(scope["method"], scope["path"], dict(scope["headers"]), server.cfg.admin_key_env,
                              server.api_keys)
            if refused:
                return await respond(send, refused[0], openai_error(refused[1], refused[0], None))
        if not (server and scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTED_PATHS):
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
        async with server.gate.shared():  # held until the response is sent: no weight swap meanwhile
            body = b"".join(chunks)
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                doc = None  # not JSON: vLLM answers that itself
            route = Route(None)
            if isinstance(doc, dict):
                headers = dict(scope["headers"])
                try:
                    route = await server.route(doc, _header(headers, USER_HEADER), _header(headers, ARM_HEADER))
                except (MergeError, AdapterError) as e:
                    status = error_status(e)
                    metrics.ERRORS.labels(str(status)).inc()
                    retry = getattr(e, "retry_after", None)
                    headers = ((b"retry-after", str(retry).encode()),) if retry else ()
                    return await respond(send, status, openai_error(str(e), status), headers)
            try:
                await self._serve(scope, body, doc, route, server, receive, send)
            finally:
                if route.held is not None:
                    server.cache.release(route.held)

    async def _serve(self, scope, body, doc, route, server, receive, send):
        if route.model is not None:
            doc["model"] = route.model
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

        if route.experiment is None:
            return await self.app(scope, replay, send)
        labeller = ArmLabeller(server, route, send)
        try:
            await self.app(scope, replay, labeller.send)
        except BaseException:
            labeller.status = 500
            raise
        finally:
            labeller.done()


def _header(headers: dict, name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


class ArmLabeller:
    """Wraps `send` for an experiment response: adds the arm header, adds {"knots": {experiment, arm}} to
    the JSON body (or to every streamed chunk), and records latency, TTFT, tokens and errors per arm."""

    def __init__(self, server: KnotsServer, route: Route, send):
        self.server, self.route, self._send = server, route, send
        self.t0, self.first = time.perf_counter(), None
        self.status, self.stream, self.start, self.held = 200, False, None, b""
        self.response_id, self.tokens, self.usage = None, 0, None
        self.label = {"experiment": route.experiment, "arm": route.arm}
        self.labels = (route.experiment, route.arm)

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"content-length"]
            headers += [(EXPERIMENT_HEADER, self.route.experiment.encode()), (ARM_HEADER, self.route.arm.encode())]
            self.stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            self.start = dict(message, headers=headers)
            if self.stream:  # a stream has no content-length; a JSON body gets a new one once rewritten
                await self._send(self.start)
            return
        if message["type"] != "http.response.body":
            return await self._send(message)
        if self.first is None:
            self.first = time.perf_counter()
        self.held += message.get("body", b"")
        more = message.get("more_body", False)
        if self.stream:
            events, sep, self.held = self.held.rpartition(b"\n\n")
            out = b"".join(self._event(e) + b"\n\n" for e in events.split(b"\n\n")) if sep else b""
            if not more:
                out, self.held = out + self.held, b""
            return await self._send({"type": "http.response.body", "body": out, "more_body": more})
        if more:
            return
        body = self._json(self.held)
        self.start["headers"].append((b"content-length", str(len(body)).encode()))
        await self._send(self.start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _json(self, raw: bytes) -> bytes:
        try:
            doc = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(doc, dict):
            self._observe(doc)
            doc["knots"] = self.label
            return json.dumps(doc).encode()
        return raw

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        return b"data: " + self._json(event[len(b"data: "):])

    def _observe(self, doc: dict) -> None:
        self.response_id = self.response_id or doc.get("id")
        usage = doc.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            self.usage = usage["completion_tokens"]
        elif self.stream and any(c.get("text") or (c.get("delta") or {}).get("content") for c in doc.get("choices", [])):
            self.tokens += 1  # vLLM streams one token per chunk

    def done(self) -> None:
        total = time.perf_counter() - self.t0
        metrics.AB_REQUESTS.labels(*self.labels).inc()
        if self.status >= 400:
            metrics.AB_ERRORS.labels(*self.labels).inc()
            return
        metrics.AB_TOKENS.labels(*self.labels).inc(self.usage if self.usage is not None else self.tokens)
        metrics.AB_TTFT.labels(*self.labels).observe((self.first or time.perf_counter()) - self.t0)
        metrics.AB_LATENCY.labels(*self.labels).observe(total)
        self.server.outcomes.served(self.response_id, *self.labels, total)
