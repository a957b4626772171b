"""Anthropic's Messages API over the engine."""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .host import LoadedModel
from .prompts import ChatRequest, prepare
from .running import collect, failure, sse, submit

__all__ = ["MessagesRequest", "router"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageSource(_Open):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ContentBlock(_Open):
    type: str
    text: str | None = None
    source: ImageSource | None = None


class Message(_Open):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ThinkingOption(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class MessagesRequest(_Open):
    model: str = ""
    max_tokens: int = Field(ge=0)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool | None = False
    thinking: ThinkingOption | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class CountTokensRequest(_Open):
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    thinking: ThinkingOption | None = None


STOP_REASON = {"length": "max_tokens"}


def to_chat_request(body: MessagesRequest | CountTokensRequest) -> ChatRequest:
    if body.tools and not (isinstance(body, MessagesRequest) and (body.tool_choice or {}).get("type") == "none"):
        raise APIError(400, "tools are not supported by this server yet")
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n\n".join(b.text for b in body.system)
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for block in message.content:
            if block.type == "text":
                parts.append({"type": "text", "text": block.text or ""})
            elif block.type == "image":
                images.append(_image_source(block.source))
                parts.append({"type": "image"})
            elif block.type in ("thinking", "redacted_thinking"):
                continue  # earlier turns' reasoning is not fed back, as the chat templates drop it too
            else:
                raise APIError(400, f"unsupported content block type {block.type!r}")
        messages.append({"role": message.role, "content": parts})
    thinking = body.thinking
    request = ChatRequest(messages=messages, images=images)
    if thinking is not None:
        request.enable_thinking = thinking.type != "disabled"
        request.thinking_budget = thinking.budget_tokens if thinking.type == "enabled" else None
    if isinstance(body, MessagesRequest):
        request.max_tokens = body.max_tokens
        request.stop = list(body.stop_sequences or [])
        request.sampling = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(body, k)) is not None}
    return request


def _image_source(source: ImageSource | None) -> str:
    if source is None:
        raise APIError(400, "an image block needs a source")
    if source.type == "url":
        if not source.url:
            raise APIError(400, "an image url source needs a url")
        return source.url
    if not source.data or not source.media_type:
        raise APIError(400, "a base64 image source needs media_type and data")
    return f"data:{source.media_type};base64,{source.data}"


def _stop(loaded: LoadedModel, event: Any, stops: list[str]) -> tuple[str, str | None]:
    if event.finish_reason == "length":
        return "max_tokens", None
    if event.stop_string is not None:
        return "stop_sequence", event.stop_string
    return "end_turn", None


router = APIRouter()


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    loaded = await request.app.state.engine.get(body.model)
    prepared = await prepare(loaded, to_chat_request(body), request.app.state.settings)
    return {"input_tokens": prepared.prompt_tokens}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Any:
    loaded = await request.app.state.engine.get(body.model)
    chat = to_chat_request(body)
    prepared = await prepare(loaded, chat, request.app.state.settings)
    message_id = f"msg_{uuid.uuid4().hex}"
    stream = submit(loaded, prepared)
    if body.stream:
        events = _stream(loaded, stream, message_id, prepared.prompt_tokens, chat.stop)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    outcome = await collect(stream, request)
    content: list[dict[str, Any]] = []
    if outcome.reasoning:
        content.append({"type": "thinking", "thinking": outcome.reasoning, "signature": ""})
    content.append({"type": "text", "text": outcome.text})
    stop_reason, stop_sequence = _stop(loaded, outcome.last, chat.stop)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": loaded.model_id,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": outcome.last.prompt_tokens, "output_tokens": outcome.last.generation_tokens},
    }


async def _stream(loaded: LoadedModel, stream: Any, message_id: str, prompt_tokens: int, stops: list[str]) -> AsyncIterator[str]:
    index = -1
    open_kind: str | None = None

    def start(kind: str) -> str:
        nonlocal index, open_kind
        index += 1
        open_kind = kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
        return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

    def stop_block() -> str:
        nonlocal open_kind
        open_kind = None
        return sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    try:
        yield sse({
            "type": "message_start",
            "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": loaded.model_id, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
            },
        }, "message_start")
        async for event in stream:
            error = failure(event)
            if error is not None:
                yield sse({"type": "error", "error": {"type": "api_error", "message": error.message}}, "error")
                return
            for kind, piece in (("thinking", event.reasoning), ("text", event.text)):
                if not piece:
                    continue
                if open_kind != kind:
                    if open_kind is not None:
                        yield stop_block()
                    yield start(kind)
                delta = {"type": "thinking_delta", "thinking": piece} if kind == "thinking" else {"type": "text_delta", "text": piece}
                yield sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
            if event.finish_reason is not None:
                if open_kind != "text":  # the answer always has its text block, empty or not
                    if open_kind is not None:
                        yield stop_block()
                    yield start("text")
                yield stop_block()
                stop_reason, stop_sequence = _stop(loaded, event, stops)
                yield sse({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": {"output_tokens": event.generation_tokens},
                }, "message_delta")
                yield sse({"type": "message_stop"}, "message_stop")
    finally:
        stream.cancel()
