"""A/B response labelling: wraps an experiment response's ASGI `send` to name the arm that answered
(header + JSON field, in every streamed chunk too) and to record its latency, TTFT, tokens and errors."""

from __future__ import annotations

import json
import time

from .. import metrics
from ..server.hub import KnotsServer
from ..server.routing import Route

ARM_HEADER, EXPERIMENT_HEADER = b"x-knots-arm", b"x-knots-experiment"


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
        """One SSE event: its `data:` line labelled (the Responses API puts an `event:` line before it)."""
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                lines[i] = b"data: " + self._json(line[len(b"data: ") :])
        return b"\n".join(lines)

    def _observe(self, doc: dict) -> None:
        if self.response_id is None and isinstance(doc.get("id"), str):
            # remembered before the client has the response, so its feedback finds the arm on any replica
            self.response_id = doc["id"]
            self.server.outcomes.remember(self.response_id, *self.labels)
        usage = doc.get("usage")
        if isinstance(usage, dict) and ("completion_tokens" in usage or "output_tokens" in usage):
            self.usage = usage.get("completion_tokens", usage.get("output_tokens"))  # chat | Responses API
        elif self.stream and any(
            c.get("text") or (c.get("delta") or {}).get("content") for c in doc.get("choices", [])
        ):
            self.tokens += 1  # vLLM streams one token per chunk

    def done(self) -> None:
        total = time.perf_counter() - self.t0
        metrics.AB_REQUESTS.labels(*self.labels).inc()
        if self.status >= 400:
            metrics.AB_ERRORS.labels(*self.labels).inc()
            self.server.outcomes.failed(*self.labels)
            return
        ttft = (self.first or time.perf_counter()) - self.t0
        metrics.AB_TOKENS.labels(*self.labels).inc(self.usage if self.usage is not None else self.tokens)
        metrics.AB_TTFT.labels(*self.labels).observe(ttft)
        metrics.AB_LATENCY.labels(*self.labels).observe(total)
        self.server.outcomes.served(*self.labels, total, ttft)
