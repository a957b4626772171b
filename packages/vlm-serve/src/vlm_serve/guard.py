"""The checks every request passes before any route runs (pure ASGI, so the body is read once, here): the Host
header (DNS rebinding), the API key, a JSON content type on state-changing routes (a cross-site form or
``text/plain`` fetch cannot send one without a CORS preflight), the body's size and read time, and that its text
is valid Unicode. Refusals come in the API's own error shape."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import time
from collections import Counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .chat_page import PAGE_PATHS
from .errors import error_body, error_headers
from .settings import ServeSettings

__all__ = ["JSON_POST_PATHS", "KNOWN_PATHS", "OPEN_PATHS", "Guard", "ServerCounters"]

OPEN_PATHS = frozenset({"/health"})
"""Reachable without the API key (load balancers' liveness probes)."""
JSON_POST_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/unload", "/v1/cache/reset"}
)
"""The routes that take a POST (others answer 404 / 405 as routing decides)."""
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


VISION_METRICS_WINDOW_S = 60.0
"""How often /metrics' vision-cache figures move."""


class ServerCounters:
    """HTTP-level counts for /metrics."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.started = time.time()
        self._vision: tuple[float, dict[str, Any]] | None = None
        self._prefix: tuple[float, dict[str, Any]] | None = None

    def vision_cache(self, cache: Any) -> dict[str, Any] | None:
        """The vision cache's hits, misses and entries as of the start of the current window: live figures
        would tell a client whether someone else sent a given image lately (send it, see a hit)."""
        if cache is None:
            return None
        now = time.monotonic()
        if self._vision is None or now - self._vision[0] >= VISION_METRICS_WINDOW_S:
            figures = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache)}
            self._vision = (now, {**figures, "window_s": VISION_METRICS_WINDOW_S})
        return self._vision[1]

    def prefix_cache(self, cache: Any) -> dict[str, Any] | None:
        """The prefix cache's counters as of the start of the current window, for the vision cache's reason
        (per tenant, timing tells the rest; GET /v1/cache/stats gives live figures to whoever holds the key)."""
        if cache is None:
            return None
        now = time.monotonic()
        if self._prefix is None or now - self._prefix[0] >= VISION_METRICS_WINDOW_S:
            stats = cache.stats()
            figures = {k: getattr(stats, k) for k in ("hits", "misses", "matched_tokens", "evictions", "disk_hits")}
            self._prefix = (now, {**figures, "window_s": VISION_METRICS_WINDOW_S})
        return self._prefix[1]


class Guard:
    def __init__(self, app: ASGIApp, *, settings: ServeSettings, counters: ServerCounters) -> None:
        self.app, self.settings, self.counters = app, settings, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        self.counters.requests[path if path in KNOWN_PATHS else "other"] += 1

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counters.statuses[message["status"]] += 1
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None:
            body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            if refusal[0]:  # 0: the client has gone, nobody to answer
                await _reply(counting_send, *refusal, path)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect notice, when it comes

        await self.app(scope, replay, counting_send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """What is wrong with the request line and headers, if anything: (status, message)."""
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b""))
        if host is not None and not self._host_allowed(host):
            return 400, f"the Host header names {host[:100]!r}, which this server does not serve (see --allowed-hosts)"
        key = self.settings.api_key
        open_path = scope["path"] in OPEN_PATHS or (self.settings.chat_page and scope["path"] in PAGE_PATHS)
        if key is not None and not open_path and not _authorized(headers, key):
            return 401, "invalid or missing API key (Authorization: Bearer <key> or x-api-key)"
        posting = scope["method"] == "POST" and scope["path"] in JSON_POST_PATHS
        if posting and key is None and not _is_json(headers.get(b"content-type", b"")):
            return 415, "POST bodies must be sent as Content-Type: application/json"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return 413, f"the request body is larger than {self.settings.max_body_bytes} bytes"
        return None

    def _host_allowed(self, host: str) -> bool:
        """An IP literal cannot be a rebound name, nor can the names of this machine; other names only when the
        operator lists them (a leading dot matches subdomains; ``*`` turns the check off)."""
        allowed = self.settings.allowed_hosts
        if "*" in allowed or host in LOCAL_NAMES or host == self.settings.host.lower():
            return True
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        return any(host == name or (name.startswith(".") and host.endswith(name)) for name in allowed)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
        limit, timeout = self.settings.max_body_bytes, self.settings.body_timeout_s
        chunks, more, size = [], True, 0
        try:
            async with asyncio.timeout(timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return b"", (0, "")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return b"", (413, f"the request body is larger than {limit} bytes")
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            return b"", (408, f"the request body did not arrive within {timeout} s")
        body = b"".join(chunks)
        problem = _not_unicode(body)
        return body, (400, problem) if problem is not None else None


KNOWN_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/models",
        "/health",
        "/metrics",
        "/unload",
        *PAGE_PATHS,
        "/v1/cache/stats",
        "/v1/cache/reset",
    }
)


def _host_name(header: bytes) -> str | None:
    """The host a Host header names, lower case, without its port (None when absent or unreadable)."""
    text = header.decode("latin-1").strip().lower()
    if not text:
        return None
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_json(content_type: bytes) -> bool:
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    candidates = [headers.get(b"x-api-key", b"")]
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        candidates.append(auth[7:].strip())
    return any(c and secrets.compare_digest(c, key.encode()) for c in candidates)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_unicode(body: bytes) -> str | None:
    """Why a body's text is not valid Unicode, if it is not: bytes that are not UTF-8, or a JSON string with an
    unpaired surrogate escape, which no tokenizer, URL or file name can take (Python's JSON parser lets both
    through). Only bodies with a surrogate escape are parsed here; paired escapes, such as an emoji, are fine."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the body is not valid UTF-8 (at byte {e.start})"
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the route answers that the body is not JSON
    stack = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "the body holds a lone UTF-16 surrogate escape (such as \\ud800): strings must be valid Unicode"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


async def _reply(send: Send, status: int, message: str, path: str) -> None:
    body = json.dumps(error_body(status, message, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(status).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
