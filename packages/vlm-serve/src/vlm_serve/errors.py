"""API errors in each API's own JSON shape: OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error", ...}``."""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "RETRY_AFTER_S", "anthropic_path", "error_body", "error_headers", "http_status"]

RETRY_AFTER_S = 1
"""What a 503 / 529 (overloaded, busy) tells a client to wait before retrying."""

# HTTP status -> (OpenAI error type, Anthropic error type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    408: ("invalid_request_error", "invalid_request_error"),
    409: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class APIError(Exception):
    """A failure the client caused or must know about; becomes a JSON error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def anthropic_path(path: str) -> bool:
    """Anthropic's endpoints answer errors in Anthropic's shape."""
    return path.startswith("/v1/messages")


def http_status(status: int, path: str) -> int:
    """The status code to send: Anthropic's API says "overloaded" with its own 529, where OpenAI's uses 503."""
    return 529 if status == 503 and anthropic_path(path) else status


def error_headers(status: int) -> dict[str, str]:
    """Headers an error response carries: when to retry an overloaded server."""
    return {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}


def error_body(
    status: int, message: str, path: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    openai_type, anthropic_type = _TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",) * 2
    )
    if anthropic_path(path):
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}
