"""OpenAI's Responses API over the engine, with ``previous_response_id`` served from a bounded in-memory store."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from .errors import APIError
from .grammar import json_schema_grammar, response_format_schema
from .media import audio_data_url, is_audio
from .prompts import ChatRequest, prepare
from .running import collect, failure, sse, streaming_response, submit, tenant_of, while_connected
from .tools import CallParser, Tool, ToolCall, split_calls
from .wire import WireModel

__all__ = ["ResponseStore", "ResponsesRequest", "router"]


@dataclass
class _Stored:
    messages: list[dict[str, Any]]
    media: list[str]
    """Digests of the conversation's images and audio clips, in order."""
    size: int
    """Bytes charged for the messages (the media are charged once each, in the store's media table)."""
    expires: float


class ResponseStore:
    """Conversations by response id, for ``previous_response_id``: at most ``max_bytes`` in all and
    ``max_entries`` entries, each kept for ``ttl_s`` seconds; the oldest go first. Images are kept once per
    content digest however many stored turns name them (a ``data:`` URL is most of a request's bytes), and
    counted against ``max_bytes`` once; a conversation that alone is over ``max_bytes`` is not stored."""

    def __init__(self, max_bytes: int = 256 * 2**20, max_entries: int = 1024, ttl_s: float = 3600.0) -> None:
        self.max_bytes, self.max_entries, self.ttl_s = max_bytes, max_entries, ttl_s
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._media: dict[str, tuple[str, int]] = {}  # digest -> (source, how many entries name it)
        self.bytes = 0

    def put(self, response_id: str, messages: list[dict[str, Any]], images: list[str]) -> bool:
        """Keep a conversation; False when it is too large to keep at all."""
        self._expire()
        size = len(json.dumps(messages, ensure_ascii=False).encode())
        digests = [hashlib.sha256(source.encode()).hexdigest() for source in images]
        sizes = {d: len(s.encode()) for d, s in zip(digests, images, strict=True)}
        if size + sum(sizes.values()) > self.max_bytes:
            return False
        new_media = {d: n for d, n in sizes.items() if d not in self._media}
        for digest, source in zip(digests, images, strict=True):
            held, count = self._media.get(digest, (source, 0))
            self._media[digest] = (held, count + 1)
        self.bytes += size + sum(new_media.values())
        self._items[response_id] = _Stored(messages, digests, size, time.monotonic() + self.ttl_s)
        while self.bytes > self.max_bytes or len(self._items) > self.max_entries:
            self._drop_oldest()
        return True

    def get(self, response_id: str) -> tuple[list[dict[str, Any]], list[str]] | None:
        """The stored conversation's messages and image sources."""
        self._expire()
        stored = self._items.get(response_id)
        if stored is None:
            return None
        return list(stored.messages), [self._media[d][0] for d in stored.media]

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values())).expires <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, stored = self._items.popitem(last=False)
        self.bytes -= stored.size
        for digest in stored.media:
            source, count = self._media[digest]
            if count == 1:
                del self._media[digest]
                self.bytes -= len(source.encode())
            else:
                self._media[digest] = (source, count - 1)


class InputPart(WireModel):
    type: str
    text: str | None = None
    image_url: str | None = None
    input_audio: dict[str, Any] | None = None


class InputItem(WireModel):
    type: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[dict[str, Any]] | None = None


class FunctionTool(WireModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class TextOptions(WireModel):
    format: dict[str, Any] | None = None


class ResponsesRequest(WireModel):
    model: str = ""
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    text: TextOptions | None = None
    stream: bool | None = False
    store: bool | None = True
    metadata: dict[str, str] | None = None


def _conversation(body: ResponsesRequest, store: ResponseStore) -> tuple[list[dict[str, Any]], list[str]]:
    """The earlier turns (from the store) and this request's input, as template messages and media sources
    (images, and audio clips as ``data:audio/`` URLs), in the order of their parts."""
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    if body.previous_response_id:
        stored = store.get(body.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"previous response {body.previous_response_id!r} not found (or expired)",
                param="previous_response_id",
            )
        messages, images = stored
    items = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for item in items:
        kind = item.type or "message"
        if kind == "message":
            if item.role is None:
                raise APIError(400, "an input message needs a role", param="input")
            role = "system" if item.role == "developer" else item.role
            if isinstance(item.content, str) or item.content is None:
                messages.append({"role": role, "content": item.content or ""})
                continue
            parts = []
            for part in item.content:
                if part.type in ("input_text", "output_text", "text"):
                    parts.append({"type": "text", "text": part.text or ""})
                elif part.type == "input_image":
                    if not part.image_url:
                        raise APIError(
                            400, "input_image needs an image_url (file ids are not supported)", param="input"
                        )
                    images.append(part.image_url)
                    parts.append({"type": "image"})
                elif part.type == "input_audio":
                    clip = part.input_audio or {}
                    images.append(audio_data_url(clip.get("data"), clip.get("format")))
                    parts.append({"type": "audio"})
                else:
                    raise APIError(400, f"unsupported input content type {part.type!r}", param="input")
            messages.append({"role": role, "content": parts})
        elif kind == "function_call":
            try:
                arguments = json.loads(item.arguments or "{}")
            except json.JSONDecodeError as e:
                raise APIError(400, f"function_call arguments are not valid JSON: {e}", param="input") from e
            call = {"id": item.call_id or "", "name": item.name or "", "arguments": arguments}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.output if isinstance(item.output, str) else json.dumps(item.output)
            messages.append({"role": "tool", "content": output, "tool_call_id": item.call_id or ""})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"unsupported input item type {kind!r}", param="input")
    return messages, images


def _tool_choice(choice: str | dict[str, Any] | None) -> str:
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return choice["name"]
    raise APIError(
        400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', param="tool_choice"
    )


async def create_response(body: ResponsesRequest, request: Request) -> Any:
    store: ResponseStore = request.app.state.responses
    history, images = _conversation(body, store)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + history
    schema = None
    if body.text and body.text.format:
        fmt = body.text.format
        if fmt.get("type") == "json_schema" and "json_schema" not in fmt:  # the Responses API's flat form
            fmt = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
        schema = response_format_schema(fmt)
    sampling = {k: v for k in ("temperature", "top_p") if (v := getattr(body, k)) is not None}
    chat = ChatRequest(
        messages=messages,
        images=[source for source in images if not is_audio(source)],
        audios=[source for source in images if is_audio(source)],
        max_tokens=body.max_output_tokens,
        sampling=sampling,
        grammar=json_schema_grammar(schema) if schema is not None else None,
        tools=[Tool(t.name, t.description or "", t.parameters or {"type": "object"}) for t in body.tools or []],
        tool_choice=_tool_choice(body.tool_choice),
    )
    async with request.app.state.engine.use(body.model) as loaded:
        prepared = await while_connected(request, prepare(loaded, chat, request.app.state.settings))
        stream = submit(loaded, prepared, tenant_of(request))
    builder = _Builder(body, loaded.model_id, prepared.tool_parser())

    def remember(text: str, calls: list[ToolCall]) -> None:
        if body.store is False:
            return
        turn: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            turn["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
        builder.stored = store.put(builder.id, history + [turn], images)

    if body.stream:
        return streaming_response(builder.stream(stream, remember), stream)
    outcome = await collect(stream, request)
    text, calls = builder.split(outcome.text, final=True)
    remember(text, calls)
    return builder.response(text, calls, outcome.reasoning, outcome.last)


class _Builder:
    """The response object and its streaming events for one request."""

    def __init__(self, body: ResponsesRequest, model_id: str, parser: CallParser | None) -> None:
        self.body, self.model_id, self.parser = body, model_id, parser
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0
        self.stored = body.store is not False
        """Whether the store kept (or will keep) this response: false too when it was too large to keep."""

    def split(self, text: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        return split_calls(self.parser, text, final=final)

    def _message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _call(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        arguments = call.arguments_json if status == "completed" else ""
        return {
            "type": "function_call",
            "id": f"fc_{call.id[5:]}",
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "status": status,
        }

    def response(
        self, text: str, calls: list[ToolCall], reasoning: str, last: Any, status: str | None = None
    ) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if reasoning:
            output.append(
                {
                    "type": "reasoning",
                    "id": f"rs_{self.id[5:]}",
                    "summary": [{"type": "summary_text", "text": reasoning}],
                }
            )
        if text or not calls:
            output.append(self._message(text))
        output.extend(self._call(c) for c in calls)
        incomplete = last is not None and last.finish_reason == "length" and not calls
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status or ("incomplete" if incomplete else "completed"),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None,
            "model": self.model_id,
            "instructions": body.instructions,
            "previous_response_id": body.previous_response_id,
            "output": output if last is not None else [],
            "parallel_tool_calls": False,
            "tool_choice": body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "text": {"format": (body.text.format if body.text and body.text.format else {"type": "text"})},
            "store": self.stored,
            "metadata": body.metadata or {},
            "usage": None
            if last is None
            else {
                "input_tokens": last.prompt_tokens,
                "input_tokens_details": {"cached_tokens": last.cached_tokens},
                "output_tokens": last.generation_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": last.prompt_tokens + last.generation_tokens,
            },
        }

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, kind)

    async def stream(self, stream: Any, remember: Any) -> AsyncIterator[str]:
        text_parts: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        message_open = False
        ids = {"item_id": self.message_id, "content_index": 0}
        try:
            yield self.event("response.created", response=self.response("", [], "", None, "in_progress"))
            yield self.event("response.in_progress", response=self.response("", [], "", None, "in_progress"))
            last = None
            async for event in stream:
                last = event
                error = failure(event)
                if error is not None:
                    failed = self.response("", [], "", None, "failed")
                    failed["error"] = {"code": "server_error", "message": error.message}
                    yield self.event("response.failed", response=failed)
                    return
                reasoning.append(event.reasoning)
                text, new_calls = self.split(event.text, final=event.finish_reason is not None)
                if text:
                    if not message_open:
                        message_open = True
                        yield self.event(
                            "response.output_item.added", output_index=0, item=self._message("", "in_progress")
                        )
                        yield self.event(
                            "response.content_part.added",
                            output_index=0,
                            **ids,
                            part={"type": "output_text", "text": "", "annotations": []},
                        )
                    text_parts.append(text)
                    yield self.event("response.output_text.delta", output_index=0, **ids, delta=text)
                calls.extend(new_calls)
            whole = "".join(text_parts)
            index = 0
            if message_open or not calls:
                if not message_open:
                    yield self.event(
                        "response.output_item.added", output_index=0, item=self._message("", "in_progress")
                    )
                    yield self.event(
                        "response.content_part.added",
                        output_index=0,
                        **ids,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                yield self.event("response.output_text.done", output_index=0, **ids, text=whole)
                yield self.event(
                    "response.content_part.done",
                    output_index=0,
                    **ids,
                    part={"type": "output_text", "text": whole, "annotations": []},
                )
                yield self.event("response.output_item.done", output_index=0, item=self._message(whole))
                index = 1
            for offset, call in enumerate(calls):
                item = self._call(call, "in_progress")
                at = index + offset
                yield self.event("response.output_item.added", output_index=at, item=item)
                yield self.event(
                    "response.function_call_arguments.delta",
                    output_index=at,
                    item_id=item["id"],
                    delta=call.arguments_json,
                )
                yield self.event(
                    "response.function_call_arguments.done",
                    output_index=at,
                    item_id=item["id"],
                    arguments=call.arguments_json,
                )
                yield self.event("response.output_item.done", output_index=at, item=self._call(call))
            remember(whole, calls)
            final = self.response(whole, calls, "", last)
            yield self.event(
                "response.completed" if final["status"] == "completed" else "response.incomplete", response=final
            )
        finally:
            stream.cancel()


def router() -> APIRouter:
    """This API's routes, made fresh for each app."""
    routes = APIRouter()
    routes.add_api_route("/v1/responses", create_response, methods=["POST"])
    return routes
