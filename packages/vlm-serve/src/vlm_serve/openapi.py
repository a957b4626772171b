"""The OpenAPI document, saying what the server really answers: FastAPI's request schemas, with every status a
route can answer in place of FastAPI's 422 (the server answers 400 for a bad body), each API's own error shape,
the streaming routes' ``text/event-stream``, ``Retry-After`` on 503 / 529, and the shape of each success."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .errors import anthropic_path
from .guard import JSON_POST_PATHS, OPEN_PATHS

__all__ = ["install"]


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


_STRING, _INTEGER, _NUMBER, _BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
_TYPED_ITEMS = {"type": "array", "items": _object({"type": _STRING})}

OPENAI_ERROR = _object(
    {"error": _object({"message": _STRING, "type": _STRING}, {"param": _nullable(_STRING), "code": _nullable(_STRING)})}
)
ANTHROPIC_ERROR = _object({"type": {"const": "error"}, "error": _object({"type": _STRING, "message": _STRING})})

CHAT_COMPLETION = _object(
    {
        "id": _STRING,
        "object": {"const": "chat.completion"},
        "created": _INTEGER,
        "model": _STRING,
        "choices": {
            "type": "array",
            "items": _object(
                {
                    "index": _INTEGER,
                    "message": _object(
                        {"role": {"const": "assistant"}, "content": _nullable(_STRING)},
                        {"tool_calls": {"type": "array"}, "reasoning_content": _STRING},
                    ),
                    "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                },
                {"logprobs": _nullable({"type": "object"})},
            ),
        },
        "usage": _object(
            {"prompt_tokens": _INTEGER, "completion_tokens": _INTEGER, "total_tokens": _INTEGER},
            {
                "completion_tokens_details": _object(
                    {"accepted_prediction_tokens": _INTEGER, "rejected_prediction_tokens": _INTEGER}
                )
            },
        ),
    }
)
MESSAGE = _object(
    {
        "id": _STRING,
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": _STRING,
        "content": _TYPED_ITEMS,
        "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        "stop_sequence": _nullable(_STRING),
        "usage": _object({"input_tokens": _INTEGER, "output_tokens": _INTEGER}),
    }
)
RESPONSE = _object(
    {
        "id": _STRING,
        "object": {"const": "response"},
        "created_at": _INTEGER,
        "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
        "model": _STRING,
        "output": _TYPED_ITEMS,
        "store": _BOOLEAN,
        "usage": _nullable(_object({"input_tokens": _INTEGER, "output_tokens": _INTEGER, "total_tokens": _INTEGER})),
    }
)
MODELS = _object(
    {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": _object({"id": _STRING, "object": {"const": "model"}, "created": _INTEGER, "owned_by": _STRING}),
        },
    }
)
SUCCESS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT_COMPLETION,
    "/v1/messages": MESSAGE,
    "/v1/responses": RESPONSE,
    "/v1/messages/count_tokens": _object({"input_tokens": _INTEGER}),
    "/v1/models": MODELS,
    "/models": MODELS,
    "/health": _object({"status": {"const": "ok"}, "model": _nullable(_STRING), "loaded": _BOOLEAN}),
    "/metrics": _object(
        {"uptime_s": _NUMBER, "http_requests": {"type": "object"}, "http_statuses": {"type": "object"}},
        {
            "model": _nullable(_STRING),
            "engine": {"type": "object"},
            "vision_cache": _nullable({"type": "object"}),
            "prefix_cache": _nullable({"type": "object"}),
            "speculative": _object(
                {
                    "kind": _STRING,
                    "draft_tokens": _INTEGER,
                    "accepted_draft_tokens": _INTEGER,
                    "acceptance_rate": _NUMBER,
                }
            ),
        },
    ),
    "/unload": _object({"unloaded": _nullable(_STRING)}),
    "/v1/cache/stats": _object(
        {"enabled": _BOOLEAN},
        {
            **{k: _INTEGER for k in ("hits", "misses", "matched_tokens", "evictions", "memory_bytes", "disk_bytes")},
            "model": _nullable(_STRING),
            "block_size": _INTEGER,
        },
    ),
    "/v1/cache/reset": _object({"enabled": _BOOLEAN}, {"dropped_blocks": _INTEGER}),
}


def _event(
    data: dict[str, Any], *, also: tuple[dict[str, Any], ...] = (), event: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One server-sent event whose ``data`` is JSON matching ``data`` (or one of ``also``)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    properties: dict[str, Any] = {"data": {"anyOf": [json_data, *also]} if also else json_data}
    if event is not None:
        properties["event"] = event
    return {"type": "object", "required": ["data"], "properties": properties}


CHUNK = _object(
    {
        "id": _STRING,
        "object": {"const": "chat.completion.chunk"},
        "model": _STRING,
        "choices": {
            "type": "array",
            "items": _object(
                {"index": _INTEGER, "delta": {"type": "object"}},
                {"finish_reason": _nullable({"enum": ["stop", "length", "tool_calls"]})},
            ),
        },
    }
)
ANTHROPIC_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
]
STREAMING: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": _event({"anyOf": [CHUNK, OPENAI_ERROR]}, also=({"const": "[DONE]"},)),
    "/v1/messages": _event(_object({"type": {"enum": ANTHROPIC_EVENTS}}), event={"enum": ANTHROPIC_EVENTS}),
    "/v1/responses": _event(
        _object({"type": {"type": "string", "pattern": "^response\\."}, "sequence_number": _INTEGER})
    ),
}
"""What each event of a ``"stream": true`` answer (``text/event-stream``) holds."""

_WHY = {
    400: "a bad request: the body, a Host the server does not serve, a prompt past the context, an unusable image",
    401: "no API key, or a wrong one (servers started with --api-key)",
    403: "media the server may not fetch: a private address, a local path outside --allow-local-media",
    404: "no such model (or previous response)",
    408: "the body did not arrive in time",
    409: "the model has requests in flight (send force)",
    413: "the body, or fetched media, over the size limit",
    415: "a POST body that is not declared as JSON",
    500: "the model failed to load or to generate",
    503: "overloaded, or busy with another model: retry after Retry-After seconds",
    529: "overloaded, or busy with another model: retry after Retry-After seconds",
}


def _statuses(path: str) -> list[int]:
    statuses = [400, 408, 503]
    if path not in OPEN_PATHS:
        statuses.append(401)
    if path in JSON_POST_PATHS:
        statuses += [413, 415]
    if path in STREAMING or path == "/v1/messages/count_tokens":
        statuses += [403, 404, 500]
    if path == "/unload":
        statuses.append(409)
    if anthropic_path(path):
        statuses = [529 if s == 503 else s for s in statuses]
    return sorted(statuses)


def _responses(path: str) -> dict[str, Any]:
    success: dict[str, Any] = {"application/json": {"schema": SUCCESS[path]}}
    if path in STREAMING:
        success["text/event-stream"] = {"schema": STREAMING[path]}
    out: dict[str, Any] = {"200": {"description": "success", "content": success}}
    error = ANTHROPIC_ERROR if anthropic_path(path) else OPENAI_ERROR
    for status in _statuses(path):
        entry: dict[str, Any] = {"description": _WHY[status], "content": {"application/json": {"schema": error}}}
        if status in (503, 529):
            entry["headers"] = {"Retry-After": {"required": True, "schema": _INTEGER}}
        out[str(status)] = entry
    return out


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and /openapi.json) serve this document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in spec["paths"].items():
                for operation in operations.values():
                    operation["responses"] = _responses(path)
            for unused in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
