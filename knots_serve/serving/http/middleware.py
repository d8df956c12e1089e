"""The request middleware (pure ASGI, inside vLLM's app): checks who may call what (auth.py), then routes
merge and experiment requests before vLLM parses them.

Every vLLM route that generates with a `model` (INFERENCE_PATHS: chat, completions, the Responses and
Anthropic Messages APIs, SageMaker's /invocations, ...) passes the merge routing and the drain gate, so
every response is computed on one set of weights and every merge it uses is held until it is sent. Any
other POST route whose body (JSON or a form) selects a merge, an experiment or a `knots` field is refused
with a 400 naming the route: nothing reaches vLLM by a merge's name without being routed here.
"""

from __future__ import annotations

import hashlib
import json

from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .. import metrics
from ..errors import ERRORS, BadRequest, NotFound, error_json, error_parts, send_error
from ..server.hub import KnotsServer
from ..server.routing import Route
from .arm_labels import ARM_HEADER, ArmLabeller
from .auth import refusal

# generation routes of vLLM 0.32 that take a `model` (checked against its routers: tests/test_routes.py)
INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/chat/completions/batch",
    "/cohere/v2/chat",
    "/invocations",
)
OWN_PATHS = ("/admin/", "/v1/feedback")  # ours: FastAPI validates them (api.py)
MAX_BODY, MAX_FORM = 8 << 20, 64 << 20  # forms carry audio uploads
USER_HEADER = b"x-knots-user"


class KnotsMiddleware:
    server: KnotsServer | None = None  # set by the endpoint plugin once the server state exists

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        server = KnotsMiddleware.server
        if not server or scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refused = refusal(scope["method"], scope["path"], headers, server.cfg.admin_key_env, server.api_keys)
        if refused:
            return await send_error(send, refused[0], error_json(refused[1], refused[0]))
        if scope["method"] != "POST" or scope["path"].startswith(OWN_PATHS):
            return await self.app(scope, receive, send)
        form = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        body = await _read(receive, MAX_FORM if form else MAX_BODY)
        if body is None:  # the client went away
            return
        if isinstance(body, int):
            return await send_error(send, 413, error_json(f"request body over {body} bytes", 413))
        doc = await _form(scope, body) if form else _json(body)
        if scope["path"] not in INFERENCE_PATHS:
            if scope["path"] == "/v1/systemone" and _no_structured_decisions(scope):
                why = "/v1/systemone is not served for this model: vLLM has no structured-decision strategy for it"
                return await self._refuse(send, NotFound(why))
            if isinstance(doc, dict) and server.selects_merge(doc):
                e = BadRequest(
                    f"{scope['path']} does not serve merges, experiments or tasks: models; they are "
                    f"served on {', '.join(INFERENCE_PATHS)}"
                )
                return await self._refuse(send, e)
            return await self.app(scope, _replay(body, receive), send)
        unreadable = _unreadable_responses_input(doc) if scope["path"] == "/v1/responses" else None
        if unreadable:
            return await self._refuse(send, BadRequest(unreadable, param="input"))
        huge = _unsendable_integer(doc)
        if huge:
            return await self._refuse(send, BadRequest(f"{huge}: integers must fit in 64 bits", param=huge))
        async with server.gate.shared():  # held until the response is sent: no weight swap meanwhile
            route = Route(None)
            if isinstance(doc, dict):
                try:
                    if doc.get("background") and server.selects_merge(doc):
                        raise BadRequest(
                            "background responses cannot use merges or experiments: they outlive "
                            "the request that holds the merge",
                            param="background",
                        )
                    route = await server.route(
                        doc,
                        _header(headers, USER_HEADER),
                        _header(headers, ARM_HEADER),
                        client=_client(scope, headers, bool(server.api_keys)),
                    )
                except ERRORS as e:
                    return await self._refuse(send, e)
            try:
                await self._serve(scope, body, doc, route, server, receive, send)
            finally:
                if route.held is not None:
                    server.cache.release(route.held)

    @staticmethod
    async def _refuse(send, e: Exception) -> None:
        status, body, headers = error_parts(e, "model")
        metrics.ERRORS.labels(str(status)).inc()
        await send_error(send, status, body, headers)

    async def _serve(self, scope, body, doc, route, server, receive, send):
        if route.model is not None:
            doc["model"] = route.model
            doc.pop("knots", None)
            body = json.dumps(doc).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        if route.experiment is None:
            return await self.app(scope, _replay(body, receive), send)
        labeller = ArmLabeller(server, route, send)
        try:
            await self.app(scope, _replay(body, receive), labeller.send)
        except BaseException:
            labeller.status = 500
            raise
        finally:
            labeller.done()


def _unreadable_responses_input(doc) -> str | None:
    """vLLM 0.32 answers 500 to a Responses API `input` holding an assistant output message (type "message")
    whose content is empty or does not start with text (a refusal): it reads content[0].text. A 400 naming the
    item instead (pinned: tests/test_fuzz.py)."""
    items = doc.get("input") if isinstance(doc, dict) else None
    for i, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "assistant":
            content = item.get("content")
            if isinstance(content, list) and not (content and isinstance(content[0], dict) and "text" in content[0]):
                return (
                    f"input[{i}]: an assistant message whose content is empty or does not start with an "
                    "output_text part cannot be read by this vLLM (0.32); put its text part first"
                )
    return None


def _unsendable_integer(doc) -> str | None:
    """Where the body holds an integer outside [-2**63, 2**64): vLLM 0.32 validates such a `stream_interval`
    (any size ≥ 1) and answers 500 when msgpack cannot send it to the engine. A 400 naming the field instead
    (pinned: tests/test_fuzz.py). A loop, not recursion: a body may nest as deep as the JSON parser allows."""
    todo = [("", doc)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            return path or "body"
        if isinstance(value, dict):
            todo.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


async def _read(receive, limit: int) -> bytes | int | None:
    """The whole body; None if the client disconnected, the limit (an int) if the body is larger."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            return limit
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives the buffered body once, then the client's own messages (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # not JSON: vLLM answers that itself


async def _form(scope, body: bytes) -> dict | None:
    """A multipart form's text fields (to see its `model`); None if it does not parse (vLLM answers)."""
    try:
        form = await Request(scope, _replay(body, None)).form()
    except (MultiPartException, ValueError, KeyError):
        return None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _no_structured_decisions(scope) -> bool:
    """vLLM 0.32 mounts /v1/systemone for every model and answers 501 (NotImplementedError) where the model
    has no structured-decision strategy (app.state.serving_structured_decisions is None): a 404 here."""
    app = scope.get("app")
    return app is not None and getattr(app.state, "serving_structured_decisions", None) is None


def _header(headers: dict, name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


def _client(scope, headers: dict, keyed: bool) -> str:
    """Who is asking, for the per-client rate of new merges: the API key's digest when the server checks API
    keys (auth.py has verified it), else the peer address (an unchecked header could be rotated at will)."""
    auth = headers.get(b"authorization")
    if keyed and auth:
        return "key:" + hashlib.sha256(auth).hexdigest()[:16]
    peer = scope.get("client")
    return f"addr:{peer[0]}" if peer else "addr:?"
