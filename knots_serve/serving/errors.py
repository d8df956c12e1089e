"""One error model for the HTTP edge: every refusal of the merge layer is one of these, answered as
OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) by the middleware and the admin routes.

The merge core raises MergeError / AdapterError (bad input: 400); the serving layer raises the classes
below, each with its status. They are MergeErrors, so code that catches MergeError still catches them.
"""

from __future__ import annotations

import json

from ..adapters import AdapterError
from ..compose import MergeError

ERRORS = (MergeError, AdapterError)  # what the merge layer raises; anything else is a bug (a 500)


class ServeError(MergeError):
    status, type = 400, "BadRequestError"
    retry_after: int | None = None  # seconds, sent as Retry-After
    param: str | None = None  # the request field at fault (OpenAI's error.param), if not the default

    def __init__(self, message: str, retry_after: int | None = None, param: str | None = None):
        super().__init__(message)
        self.param = param
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(ServeError):
    pass


class NotFound(ServeError):
    status, type = 404, "NotFoundError"


class Conflict(ServeError):
    status, type = 409, "ConflictError"


class TooManyRequests(ServeError):
    status, type = 429, "RateLimitError"


class Unavailable(ServeError):
    status, type = 503, "ServiceUnavailableError"


# statuses the middleware answers itself, before any of the above can be raised
TYPES = {401: "AuthenticationError", 403: "PermissionDeniedError", 413: "RequestTooLarge"}


def status_of(e: Exception) -> int:
    return getattr(e, "status", 400)


def error_json(message: str, status: int, param: str | None = None) -> bytes:
    kind = TYPES.get(status) or next(
        (c.type for c in ServeError.__subclasses__() if c.status == status), "BadRequestError"
    )
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


def error_parts(e: Exception, param: str | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, JSON body, extra headers) for a merge-layer error; `param`: the field at fault unless the
    error names its own."""
    status, retry = status_of(e), getattr(e, "retry_after", None)
    headers = [(b"retry-after", str(retry).encode())] if retry else []
    return status, error_json(str(e), status, getattr(e, "param", None) or param), headers


async def send_error(send, status: int, body: bytes, headers: list | tuple = ()) -> None:
    """Answer on a raw ASGI `send` (the middleware runs before FastAPI)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_response(e: Exception):
    """The same answer as a FastAPI response (the admin routes)."""
    from fastapi.responses import Response

    status, body, headers = error_parts(e)
    return Response(body, status, {k.decode(): v.decode() for k, v in headers}, media_type="application/json")
