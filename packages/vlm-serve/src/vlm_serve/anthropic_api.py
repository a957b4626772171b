"""Anthropic's Messages API over the engine."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from vlm_runtime import GenerationResult

from .errors import APIError
from .host import LoadedModel
from .prompts import ChatRequest, prepare
from .running import collect, failure, sse, streaming_response, submit, tenant_of, while_connected
from .tools import CallParser, Tool, ToolCall, split_calls
from .wire import WireModel

__all__ = ["MessagesRequest", "router"]


class ImageSource(WireModel):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ContentBlock(WireModel):
    type: str
    text: str | None = None
    source: ImageSource | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class ToolDefinition(WireModel):
    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class TextBlock(WireModel):
    type: Literal["text"]
    text: str


class ThinkingOption(WireModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class MessagesRequest(WireModel):
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
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None


class CountTokensRequest(WireModel):
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingOption | None = None


def to_chat_request(body: MessagesRequest | CountTokensRequest) -> ChatRequest:
    tools = []
    for tool in body.tools or []:
        if tool.type not in (None, "custom"):
            raise APIError(400, f"server tool {tool.type!r} is not available here; only client tools are supported")
        tools.append(Tool(tool.name, tool.description, tool.input_schema))
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
        calls: list[dict[str, Any]] = []
        for block in message.content:
            if block.type == "tool_use":
                if message.role != "assistant" or not block.name:
                    raise APIError(400, "tool_use blocks belong in assistant messages and need a name")
                calls.append({"id": block.id or "", "name": block.name, "arguments": block.input or {}})
            elif block.type == "tool_result":
                result = (
                    block.content
                    if isinstance(block.content, str)
                    else "".join(
                        b.get("text", "")
                        for b in block.content or []
                        if isinstance(b, dict) and b.get("type") == "text"
                    )
                )
                if block.is_error:
                    result = f"Error: {result}"
                messages.append({"role": "tool", "content": result, "tool_call_id": block.tool_use_id or ""})
            elif block.type == "text":
                parts.append({"type": "text", "text": block.text or ""})
            elif block.type == "image":
                images.append(_image_source(block.source))
                parts.append({"type": "image"})
            elif block.type in ("thinking", "redacted_thinking"):
                continue  # earlier turns' reasoning is not fed back, as the chat templates drop it too
            else:
                raise APIError(400, f"unsupported content block type {block.type!r}")
        if parts or calls or not messages or messages[-1]["role"] != "tool":
            entry: dict[str, Any] = {"role": message.role, "content": parts}
            if calls:
                entry["tool_calls"] = calls
            messages.append(entry)
    thinking = body.thinking
    request = ChatRequest(messages=messages, images=images, tools=tools, tool_choice=_tool_choice(body.tool_choice))
    if thinking is not None:
        request.enable_thinking = thinking.type != "disabled"
        request.thinking_budget = thinking.budget_tokens if thinking.type == "enabled" else None
    if isinstance(body, MessagesRequest):
        request.max_tokens = body.max_tokens
        request.stop = list(body.stop_sequences or [])
        request.sampling = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(body, k)) is not None}
    return request


def _tool_choice(choice: ToolChoice | None) -> str:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name')
        return choice.name
    return {"any": "required", "none": "none"}[choice.type]


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


def _stop(event: Any, used_tools: bool) -> tuple[str, str | None]:
    if used_tools:
        return "tool_use", None
    if event.finish_reason == "length":
        return "max_tokens", None
    if event.stop_string is not None:
        return "stop_sequence", event.stop_string
    return "end_turn", None


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    async with request.app.state.engine.use(body.model) as loaded:
        chat = to_chat_request(body)
        prepared = await while_connected(request, prepare(loaded, chat, request.app.state.settings))
    return {"input_tokens": prepared.prompt_tokens}


async def messages(body: MessagesRequest, request: Request) -> Any:
    async with request.app.state.engine.use(body.model) as loaded:
        chat = to_chat_request(body)
        prepared = await while_connected(request, prepare(loaded, chat, request.app.state.settings))
        stream = submit(loaded, prepared, tenant_of(request))
    message_id = f"msg_{uuid.uuid4().hex}"
    parser = prepared.tool_parser("toolu_")
    if body.stream:
        events = _stream(loaded, stream, message_id, prepared.prompt_tokens, parser)
        return streaming_response(events, stream)
    outcome = await collect(stream, request)
    text, calls = split_calls(parser, outcome.text, final=True)
    content: list[dict[str, Any]] = []
    if outcome.reasoning:
        content.append({"type": "thinking", "thinking": outcome.reasoning, "signature": ""})
    if text or not calls:
        content.append({"type": "text", "text": text})
    content.extend(_tool_use(c) for c in calls)
    stop_reason, stop_sequence = _stop(outcome.last, bool(calls))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": loaded.model_id,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {**_input_usage(outcome.last), "output_tokens": outcome.last.generation_tokens},
    }


def _input_usage(event: GenerationResult) -> dict[str, int]:
    """Anthropic's split of the prompt: tokens read from the prefix cache are not counted in input_tokens."""
    cached = min(event.cached_tokens, event.prompt_tokens)
    return {"input_tokens": event.prompt_tokens - cached, "cache_read_input_tokens": cached}


async def _stream(
    loaded: LoadedModel, stream: Any, message_id: str, prompt_tokens: int, parser: CallParser | None
) -> AsyncIterator[str]:
    index = -1
    open_kind: str | None = None
    wrote_text = False

    def start(block: dict[str, Any]) -> str:
        nonlocal index, open_kind
        index += 1
        open_kind = block["type"]
        return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

    def stop_block() -> str:
        nonlocal open_kind
        open_kind = None
        return sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    def delta(payload: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": index, "delta": payload}, "content_block_delta")

    def pieces(kind: str, piece: str) -> list[str]:
        nonlocal wrote_text
        out = []
        if open_kind != kind:
            if open_kind is not None:
                out.append(stop_block())
            out.append(
                start(
                    {"type": "thinking", "thinking": "", "signature": ""}
                    if kind == "thinking"
                    else {"type": "text", "text": ""}
                )
            )
        if kind == "thinking":
            out.append(delta({"type": "thinking_delta", "thinking": piece}))
        else:
            wrote_text = True
            out.append(delta({"type": "text_delta", "text": piece}))
        return out

    try:
        yield sse(
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": loaded.model_id,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
                },
            },
            "message_start",
        )
        async for event in stream:
            error = failure(event)
            if error is not None:
                yield sse({"type": "error", "error": {"type": "api_error", "message": error.message}}, "error")
                return
            text, calls = split_calls(parser, event.text, final=event.finish_reason is not None)
            if event.reasoning:
                for line in pieces("thinking", event.reasoning):
                    yield line
            if text:
                for line in pieces("text", text):
                    yield line
            for call in calls:
                if open_kind is not None:
                    yield stop_block()
                yield start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                yield delta({"type": "input_json_delta", "partial_json": call.arguments_json})
                yield stop_block()
            if event.finish_reason is not None:
                used_tools = parser is not None and bool(parser.calls)
                if not wrote_text and not used_tools:  # an answer always has its text block, even empty
                    if open_kind is not None:
                        yield stop_block()
                    yield start({"type": "text", "text": ""})
                if open_kind is not None:
                    yield stop_block()
                stop_reason, stop_sequence = _stop(event, used_tools)
                yield sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                        "usage": {**_input_usage(event), "output_tokens": event.generation_tokens},
                    },
                    "message_delta",
                )
                yield sse({"type": "message_stop"}, "message_stop")
    finally:
        stream.cancel()


def router() -> APIRouter:
    """This API's routes, made fresh for each app."""
    routes = APIRouter()
    routes.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])
    routes.add_api_route("/v1/messages", messages, methods=["POST"])
    return routes
