"""Running one engine request from an HTTP handler: submit, collect or stream, cancel when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from vlm_runtime import EngineBusy, GenerationResult, RequestStream

from .errors import APIError
from .host import LoadedModel
from .prompts import PreparedRequest

__all__ = ["CLIENT_GONE", "Outcome", "collect", "sse", "streaming_response", "submit", "while_connected"]

DISCONNECT_POLL_S = 0.25
CLIENT_GONE = 499
"""The status logged for a request whose client left before the answer (nginx's "client closed request")."""

T = TypeVar("T")


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or, when the client disconnects first, ``work`` cancelled: a prompt is not prepared
    (images fetched, text rendered and counted) for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(CLIENT_GONE, "the client closed the connection")
    finally:
        task.cancel()


TENANT_HEADER = "x-prefix-cache-tenant"
MAX_TENANT_CHARS = 256


def tenant_of(request: Any) -> str:
    """The request's prefix-cache tenant (``X-Prefix-Cache-Tenant``; none: the shared namespace). Blocks are
    shared only within a tenant, so a client cannot learn from timing what another tenant sent."""
    tenant = request.headers.get(TENANT_HEADER, "")
    if len(tenant) > MAX_TENANT_CHARS:
        raise APIError(400, f"the {TENANT_HEADER} header is longer than {MAX_TENANT_CHARS} characters")
    return tenant


def submit(loaded: LoadedModel, prepared: PreparedRequest, tenant: str = "") -> RequestStream:
    """Hand ``prepared`` to the model's engine, in prefix-cache namespace ``tenant``."""
    request = prepared.request if not tenant else replace(prepared.request, prefix_cache_tenant=tenant)
    try:
        return loaded.engine.submit(request)
    except EngineBusy as e:
        raise APIError(503, str(e)) from e


@dataclass
class Outcome:
    """A finished request: its text, reasoning and per-token events."""

    text: str = ""
    reasoning: str = ""
    events: list[GenerationResult] = field(default_factory=list)
    last: GenerationResult | None = None


def failure(event: GenerationResult) -> APIError | None:
    """The error a request's last event stands for, if any."""
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}")
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the model was unloaded or the server is shutting down")
    return None


async def collect(stream: RequestStream, request: Request) -> Outcome:
    """Run a request to its end; cancels it when the client disconnects first."""
    watcher = asyncio.create_task(_cancel_on_disconnect(stream, request))
    outcome = Outcome()
    try:
        async for event in stream:
            outcome.text += event.text
            outcome.reasoning += event.reasoning
            outcome.events.append(event)
            outcome.last = event
    finally:
        watcher.cancel()
        stream.cancel()
    assert outcome.last is not None
    error = failure(outcome.last)
    if error is not None:
        raise error
    return outcome


async def _cancel_on_disconnect(stream: RequestStream, request: Request) -> None:
    while not stream.done:
        if await request.is_disconnected():
            stream.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def coalesce(chunks: AsyncIterator[str], stream: RequestStream) -> AsyncIterator[str]:
    """Join the SSE chunks of events that were already waiting into one write: under load the engine runs
    ahead of the event loop, and one socket write per token per client is then most of the server's work."""
    held: list[str] = []
    async for chunk in chunks:
        held.append(chunk)
        if stream.pending == 0:
            yield "".join(held)
            held = []
    if held:
        yield "".join(held)


def streaming_response(chunks: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
    return StreamingResponse(
        coalesce(chunks, stream), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
