"""The FastAPI application: ``create_app(engine, settings)``. All state lives on the app it returns."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import anthropic_api, openai_api, responses_api
from .errors import APIError, error_body, error_headers, http_status
from .host import ServingEngine
from .settings import ServeSettings
from .wire import WireModel

__all__ = ["create_app"]

_log = logging.getLogger("vlm_serve")

OPEN_PATHS = frozenset({"/health"})
"""Reachable without the API key (load balancers' liveness probes)."""


class UnloadRequest(WireModel):
    force: bool = False


class ServerCounters:
    """HTTP-level counts for /metrics."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.started = time.time()


def create_app(engine: ServingEngine | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The server for ``engine`` (a ``ServingEngine``; by default one that loads ``settings.model`` on demand)."""
    settings = settings or (engine.settings if engine is not None else ServeSettings())
    engine = engine or ServingEngine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="vlm-serve", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.counters = ServerCounters()
    app.state.responses = responses_api.ResponseStore(max_bytes=settings.response_store_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.status, exc.message, request.url.path, param=exc.param, code=exc.code)
        status = http_status(exc.status, request.url.path)
        return JSONResponse(body, status_code=status, headers=error_headers(exc.status))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, _describe_validation(exc), request.url.path), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(exc.status_code, str(exc.detail), request.url.path)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (which may name files) go to the log, not to the client.
        _log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return JSONResponse(error_body(500, "internal error", request.url.path), status_code=500)

    app.include_router(openai_api.router())
    app.include_router(anthropic_api.router())
    app.include_router(responses_api.router())
    _add_admin_routes(app)
    app.add_middleware(_Guard, settings=settings, counters=app.state.counters)
    return app


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request body"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}"


def _add_admin_routes(app: FastAPI) -> None:
    def model_cards(request: Request) -> dict[str, Any]:
        engine: ServingEngine = request.app.state.engine
        created = engine.loaded.created if engine.loaded is not None else int(request.app.state.counters.started)
        data = [{"id": i, "object": "model", "created": created, "owned_by": "vlm"} for i in engine.served_ids()]
        return {"object": "list", "data": data}

    app.get("/v1/models")(model_cards)
    app.get("/models")(model_cards)

    @app.get("/health")
    def health(request: Request) -> dict[str, Any]:
        loaded = request.app.state.engine.loaded
        return {"status": "ok", "model": loaded.model_id if loaded is not None else None, "loaded": loaded is not None}

    @app.post("/unload")
    async def unload(request: Request, body: UnloadRequest | None = None) -> dict[str, Any]:
        """Unload the model (the next request that names it loads it again); refused while it has requests in
        flight unless ``force``, which cancels them."""
        unloaded = await request.app.state.engine.unload(force=body is not None and body.force)
        return {"unloaded": unloaded}

    @app.get("/metrics")
    def metrics(request: Request) -> dict[str, Any]:
        counters: ServerCounters = request.app.state.counters
        loaded = request.app.state.engine.loaded
        out: dict[str, Any] = {
            "uptime_s": time.time() - counters.started,
            "http_requests": dict(counters.requests),
            "http_statuses": {str(k): v for k, v in counters.statuses.items()},
            "model": loaded.model_id if loaded is not None else None,
        }
        if loaded is not None:
            stats = loaded.engine.stats()
            out["engine"] = {
                "requests": stats.requests,
                "finished": stats.finished,
                "cancelled": stats.cancelled,
                "errors": stats.errors,
                "running": stats.active,
                "queue_depth": stats.waiting,
                "prompt_tokens": stats.prompt_tokens,
                "generation_tokens": stats.generation_tokens,
                "generation_tokens_per_s": stats.generation_tokens / stats.busy_s if stats.busy_s else 0.0,
                "time_to_first_token_s": stats.time_to_first_token_s,
                "latency_s": stats.latency_s,
            }
            cache = loaded.vision_cache
            out["vision_cache"] = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache)} if cache else None
        return out


class _Guard:
    """API key, body size limit and counters, before any route runs (pure ASGI: the body is read once here)."""

    def __init__(self, app: ASGIApp, *, settings: ServeSettings, counters: ServerCounters) -> None:
        self.app, self.settings, self.counters = app, settings, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        self.counters.requests[path if path in _KNOWN else "other"] += 1

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counters.statuses[message["status"]] += 1
            await send(message)

        key = self.settings.api_key
        if key is not None and path not in OPEN_PATHS and not _authorized(scope, key):
            await _reply(
                counting_send, 401, "invalid or missing API key (Authorization: Bearer <key> or x-api-key)", path
            )
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        limit = self.settings.max_body_bytes
        if declared.isdigit() and int(declared) > limit:
            await _reply(counting_send, 413, f"the request body is larger than {limit} bytes", path)
            return
        body, more, size = [], True, 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(counting_send, 413, f"the request body is larger than {limit} bytes", path)
                return
            body.append(chunk)
            more = message.get("more_body", False)
        whole = b"".join(body)
        problem = _not_unicode(whole)
        if problem is not None:
            await _reply(counting_send, 400, problem, path)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # then the disconnect notice, when it comes

        await self.app(scope, replay, counting_send)


_KNOWN = frozenset(
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
    }
)


def _authorized(scope: Scope, key: str) -> bool:
    headers = dict(scope["headers"])
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
