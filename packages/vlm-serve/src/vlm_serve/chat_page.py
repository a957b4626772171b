"""The single-page chat served at ``/`` (``--no-chat-page`` turns it off): a few static files shipped in this
package, read once, served with a content security policy that lets the page reach nothing but this server. The
page needs no key to load (it holds no secrets); it asks for the key when the server has one, and every API call
it makes then carries it."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

from fastapi import FastAPI, Response

__all__ = ["PAGE_PATHS", "install"]

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/chat/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(_ASSETS)
"""The page's paths: open without the API key when the page is on."""

_HEADERS = {
    # Scripts, styles and connections from this origin only; images also from the data: / blob: URLs of uploads.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI, key_required: bool) -> None:
    """Add the page's routes to ``app``; the page is told whether to ask for an API key."""
    static = files("vlm_serve") / "static"
    for path, (name, media_type) in _ASSETS.items():
        body = (static / name).read_text(encoding="utf-8")
        if name == "index.html":
            body = body.replace("{{KEY_REQUIRED}}", "true" if key_required else "false")
        app.add_api_route(path, _responder(body.encode(), media_type), methods=["GET"], include_in_schema=False)


def _responder(body: bytes, media_type: str) -> Callable[[], Response]:
    def asset() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return asset
