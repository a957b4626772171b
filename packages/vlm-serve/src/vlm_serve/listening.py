"""uvicorn under the server's connection limits, which uvicorn itself does not set: request headers capped in
size and in the time they may take to arrive (a slow-headers client holds nothing for long), and a cap on open
connections (one more is answered 503 and closed at once). The body's read time is bounded in the guard."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import RETRY_AFTER_S
from .settings import ServeSettings

__all__ = ["uvicorn_config"]


def uvicorn_config(app: Any, settings: ServeSettings, **options: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` that serves ``app`` under ``settings``' limits (``options`` go to uvicorn)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=_limited(settings),
        timeout_keep_alive=5,
        **options,
    )


def _limited(settings: ServeSettings) -> type[HttpToolsProtocol]:
    class Limited(_LimitedProtocol):
        max_header_bytes = settings.max_header_bytes
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return Limited


class _HeadersTooLarge(Exception):
    pass


class _LimitedProtocol(HttpToolsProtocol):
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                % RETRY_AFTER_S
            )
            transport.close()
            return
        self._header_bytes = 0
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # that request's headers are in already
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm_header_deadline()  # for the next request's headers on this connection

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise _HeadersTooLarge  # the parser stops; uvicorn answers 400 and closes the connection

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
