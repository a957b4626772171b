"""The FastAPI application: ``create_app(engine, settings)``. All state lives on the app it returns."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_api, chat_page, openai_api, openapi, responses_api
from .errors import APIError, error_body, error_headers, http_status
from .guard import Guard, ServerCounters
from .host import ModelHost
from .settings import ServeSettings
from .wire import WireModel

__all__ = ["create_app"]

_log = logging.getLogger("vlm_serve")


class UnloadRequest(WireModel):
    force: bool = False


class CacheResetRequest(WireModel):
    disk: bool = True
    """Remove the disk tier's shards too."""


def create_app(engine: ModelHost | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The server for ``engine`` (a ``ModelHost``; by default one that loads ``settings.model`` on demand)."""
    settings = settings or (engine.settings if engine is not None else ServeSettings())
    engine = engine or ModelHost(settings)

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
    if settings.chat_page:
        chat_page.install(app, key_required=settings.api_key is not None)
    openapi.install(app)
    app.add_middleware(Guard, settings=settings, counters=app.state.counters)
    if settings.cors_origins:  # outside the guard: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
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
        engine: ModelHost = request.app.state.engine
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
            if loaded.draft_kind is not None:
                out["speculative"] = {
                    "kind": loaded.draft_kind,
                    "draft_tokens": stats.draft_tokens,
                    "accepted_draft_tokens": stats.accepted_draft_tokens,
                    "acceptance_rate": stats.accepted_draft_tokens / stats.draft_tokens if stats.draft_tokens else 0.0,
                }
            out["vision_cache"] = counters.vision_cache(loaded.vision_cache)
            out["prefix_cache"] = counters.prefix_cache(loaded.prefix_cache)
        return out

    @app.get("/v1/cache/stats")
    def cache_stats(request: Request) -> dict[str, Any]:
        """The loaded model's prefix cache: cumulative hits, misses, reused tokens, evictions; blocks and bytes
        per tier."""
        loaded = request.app.state.engine.loaded
        cache = loaded.prefix_cache if loaded is not None else None
        if cache is None:
            return {"enabled": False, "model": loaded.model_id if loaded is not None else None}
        return {
            "enabled": True,
            "model": loaded.model_id,
            "block_size": cache.settings.block_size,
            "max_blocks": cache.settings.max_blocks,
            "max_memory_bytes": cache.settings.max_bytes,
            "disk_max_bytes": cache.settings.disk_max_bytes if cache.settings.disk_dir is not None else 0,
            **cache.stats().as_dict(),
        }

    @app.post("/v1/cache/reset")
    def cache_reset(request: Request, body: CacheResetRequest | None = None) -> dict[str, Any]:
        """Drop every prefix-cache block no running request holds (and the disk tier's, unless disk is false)."""
        loaded = request.app.state.engine.loaded
        cache = loaded.prefix_cache if loaded is not None else None
        if cache is None:
            return {"enabled": False}
        return {"enabled": True, "dropped_blocks": cache.reset(disk=body is None or body.disk)}
