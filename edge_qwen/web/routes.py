"""Serve the chat page: `/` (index.html) and `/web/<file>` from the package's static/ folder.

Every answer carries a Content-Security-Policy that lets the page load and call nothing but its
own origin (no CDN, no inline script, no frames), so the page works offline and a Markdown
answer cannot pull in anything from elsewhere. Files are read from the installed package
(importlib.resources), so the wheel serves exactly what it ships.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.resources import files
from pathlib import PurePosixPath

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

# Nothing from elsewhere: scripts, styles, images, fonts and fetch() only from this origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; font-src 'self'; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=64)
def _asset(name: str) -> tuple[bytes, str, str]:
    """(body, content type, ETag) of static/<name>; 404 for anything not shipped."""
    parts = PurePosixPath(name).parts
    suffix = PurePosixPath(name).suffix.lower()
    if not parts or any(p in ("..", ".") or p.startswith(".") for p in parts) or suffix not in CONTENT_TYPES:
        raise HTTPException(404, "Not Found")
    resource = files(__package__).joinpath("static", *parts)
    if not resource.is_file():
        raise HTTPException(404, "Not Found")
    body = resource.read_bytes()
    return body, CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _answer(request: Request, name: str) -> Response:
    body, content_type, etag = _asset(name)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache", "ETag": etag,
               "Cross-Origin-Opener-Policy": "same-origin", "X-Frame-Options": "DENY"}
    if request.headers.get("if-none-match") == etag:  # no-cache + ETag: revalidated, never stale
        return Response(status_code=304, headers=headers)
    if request.method == "HEAD":
        return Response(headers={**headers, "Content-Length": str(len(body))}, media_type=content_type)
    return Response(body, media_type=content_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    """The chat page."""
    return _answer(request, "index.html")


@router.api_route("/web/{name:path}", methods=["GET", "HEAD"])
async def asset(request: Request, name: str) -> Response:
    """The page's scripts, styles and icons (vendored libraries under /web/vendor/)."""
    return _answer(request, name)
