"""The operator console (docs/CONSOLE.md): one page and its script, served by the same app. The files hold
no data and need no key (auth.py lets /console through); the script reads the admin API with the key the
operator enters. uPlot (MIT, v1.6.32: uPlot.LICENSE) is vendored beside them: the server runs offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".LICENSE": "text/plain"}
FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in TYPES}  # what may be asked for, and nothing else
# the page loads only its own files and talks only to this server; no framing (clickjacking)
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@router.get("/console", include_in_schema=False)
async def page():
    return _file("console.html")


@router.get("/console/{name}", include_in_schema=False)
async def asset(name: str):
    return _file(name)


def _file(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        return Response(f"no console file {name!r}\n", 404, media_type="text/plain")
    return FileResponse(path, media_type=f"{TYPES[path.suffix]}; charset=utf-8", headers=HEADERS)
