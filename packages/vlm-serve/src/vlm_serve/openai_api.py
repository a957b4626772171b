"""OpenAI's Chat Completions API over the engine."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from .errors import APIError
from .grammar import json_schema_grammar, response_format_schema
from .host import LoadedModel
from .media import audio_data_url
from .prompts import ChatRequest, prepare, token_text
from .running import collect, failure, sse, streaming_response, submit, tenant_of, while_connected
from .tools import CallParser, Tool, ToolCall, split_calls
from .wire import WireModel

__all__ = ["ChatCompletionRequest", "router"]

FINISH = {"stop": "stop", "length": "length"}


class ImageURL(WireModel):
    url: str
    detail: str | None = None


class ContentPart(WireModel):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    video_url: ImageURL | str | None = None
    input_audio: dict[str, Any] | None = None


class FunctionCall(WireModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(WireModel):
    id: str = ""
    type: str = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(WireModel):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(WireModel):
    include_usage: bool = False


class ChatCompletionRequest(WireModel):
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int | None = Field(default=1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = False
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    video_audio: bool | None = None
    """Our extension: hear each video part's sound track too (Qwen2.5-Omni), as ``vlm generate --video-audio``."""


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    if (body.n or 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    messages: list[dict[str, Any]] = []
    media: dict[str, list[str]] = {"image": [], "video": [], "audio": []}
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, list):
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                elif part.type in ("image_url", "video_url"):
                    kind = part.type.removesuffix("_url")
                    value = getattr(part, part.type)
                    url = value.url if isinstance(value, ImageURL) else value
                    if not url:
                        raise APIError(400, f"the {part.type} part needs a url", param="messages")
                    media[kind].append(url)
                    parts.append({"type": kind})
                elif part.type == "input_audio":
                    clip = part.input_audio or {}
                    media["audio"].append(audio_data_url(clip.get("data"), clip.get("format")))
                    parts.append({"type": "audio"})
                else:
                    raise APIError(400, f"unsupported content part type {part.type!r}", param="messages")
            entry: dict[str, Any] = {"role": role, "content": parts}
        else:
            entry = {"role": role, "content": message.content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [_incoming_call(c) for c in message.tool_calls]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id or ""
        messages.append(entry)
    sampling: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ):
        value = getattr(body, name)
        if value is not None:
            sampling[name] = value
    if body.logit_bias:
        try:
            sampling["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError as e:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from e
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    schema = response_format_schema(body.response_format) if body.response_format else None
    tools = [
        Tool(t.function.name, t.function.description, t.function.parameters or {"type": "object"})
        for t in body.tools or []
    ]
    return ChatRequest(
        tools=tools,
        tool_choice=_tool_choice(body.tool_choice),
        grammar=json_schema_grammar(schema) if schema is not None else None,
        messages=messages,
        images=media["image"],
        videos=media["video"],
        audios=media["audio"],
        video_audio=bool(body.video_audio),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        logprobs=bool(body.logprobs),
        top_logprobs=top,
        enable_thinking=body.enable_thinking,
        thinking_budget=body.thinking_budget,
        ignore_eos=bool(body.ignore_eos),
    )


def _tool_choice(choice: str | dict[str, Any] | None) -> str:
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(
            400,
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return name


def _incoming_call(call: ToolCallIn) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise APIError(
                400, f"tool call arguments of {call.function.name!r} are not valid JSON: {e}", param="messages"
            ) from e
    return {"id": call.id, "name": call.function.name, "arguments": arguments}


def _outgoing_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    return out if index is None else {"index": index, **out}


def _logprob_entry(processor: Any, event: Any) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(processor, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    entry = item(event.token, event.logprob)
    entry["top_logprobs"] = [item(t, lp) for t, lp in event.top_logprobs]
    return entry


def _has_logprob(loaded: LoadedModel, event: Any) -> bool:
    return event.logprob is not None and event.token is not None and event.token not in loaded.processor.eos_token_ids


def _usage(last: Any) -> dict[str, Any]:
    """The usage of a request from its last event; with speculative decoding, the drafter's proposals the
    target kept and rejected (OpenAI's prediction-token fields)."""
    usage = {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.generation_tokens,
        "total_tokens": last.prompt_tokens + last.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }
    if last.draft_tokens:
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": last.accepted_draft_tokens,
            "rejected_prediction_tokens": last.draft_tokens - last.accepted_draft_tokens,
        }
    return usage


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    settings = request.app.state.settings
    async with request.app.state.engine.use(body.model) as loaded:
        prepared = await while_connected(request, prepare(loaded, to_chat_request(body), settings))
        stream = submit(loaded, prepared, tenant_of(request))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        parser = prepared.tool_parser()
        chunks = _stream(loaded, stream, completion_id, created, body.logprobs, include_usage, parser)
        return streaming_response(chunks, stream)
    outcome = await collect(stream, request)
    last = outcome.last
    text, calls = split_calls(prepared.tool_parser(), outcome.text, final=True)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = [_outgoing_call(c) for c in calls]
    if outcome.reasoning:
        message["reasoning_content"] = outcome.reasoning
    finish = "tool_calls" if calls else FINISH[last.finish_reason]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    if body.logprobs:
        choice["logprobs"] = {
            "content": [_logprob_entry(loaded.processor, e) for e in outcome.events if _has_logprob(loaded, e)]
        }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": loaded.model_id,
        "choices": [choice],
        "usage": _usage(last),
    }


async def _stream(
    loaded: LoadedModel,
    stream: Any,
    completion_id: str,
    created: int,
    logprobs: bool | None,
    include_usage: bool,
    parser: CallParser | None,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": loaded.model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return sse(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        last = None
        async for event in stream:
            last = event
            error = failure(event)
            if error is not None:
                yield sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": None}})
                break
            delta: dict[str, Any] = {}
            if event.reasoning:
                delta["reasoning_content"] = event.reasoning
            text, calls = split_calls(parser, event.text, final=event.finish_reason is not None)
            if text:
                delta["content"] = text
            if calls:
                first = len(parser.calls) - len(calls) if parser is not None else 0
                delta["tool_calls"] = [_outgoing_call(c, first + i) for i, c in enumerate(calls)]
            lp = None
            if logprobs and _has_logprob(loaded, event):
                lp = {"content": [_logprob_entry(loaded.processor, event)]}
            if delta or lp is not None:
                yield chunk(delta, None, lp)
            if event.finish_reason is not None:
                yield chunk({}, "tool_calls" if parser is not None and parser.calls else FINISH[event.finish_reason])
        if include_usage and last is not None and failure(last) is None:
            yield sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": loaded.model_id,
                    "choices": [],
                    "usage": _usage(last),
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()


def router() -> APIRouter:
    """This API's routes, made fresh for each app."""
    routes = APIRouter()
    routes.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return routes
