"""Tool calling in the Hermes / Qwen format: definitions into the prompt, ``<tool_call>{json}</tool_call>``
blocks out of the generated text (streamed or not), and a grammar that forces a call when the request says so.

Templates that render tools themselves (Qwen2.5's, Hermes') get the definitions and the tool messages as they
are; for templates that do not, the tools are described in a system message and calls/results are written in
the same tags, so the conversation still reads the way the model family was trained on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from .errors import APIError
from .grammar import JSON_LAYOUT

__all__ = ["Tool", "ToolCall", "ToolCallParser", "forced_call_grammar", "render_tools", "resolve_choice", "split_calls"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


def resolve_choice(choice: str, tools: list[Tool]) -> str:
    """Check a normalised tool choice ("auto", "none", "required" or a tool's name) against the tools."""
    if choice in ("auto", "none"):
        return choice
    if not tools:
        raise APIError(400, "tool_choice asks for a tool call but no tools were given", param="tool_choice")
    if choice != "required" and choice not in {t.name for t in tools}:
        raise APIError(400, f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice")
    return choice


def forced_call_grammar(tools: list[Tool], choice: str) -> str | None:
    """For "required" or a named tool: a grammar that admits exactly one call block of an allowed tool, with
    arguments valid under that tool's schema. None for "auto"."""
    if choice in ("auto", "none"):
        return None
    allowed = [t for t in tools if choice == "required" or t.name == choice]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": JSON_LAYOUT}
    lark = f'start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: %json {json.dumps(schema)}\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


def template_renders_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def _describe(tools: list[Tool]) -> str:
    lines = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return (
        "You can call functions. Their definitions, one JSON object per line:\n"
        f"<tools>\n{lines}\n</tools>\n"
        f"To call one, answer with {OPEN}\n"
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
        f"{CLOSE} (one block per call). Results come back inside <tool_response></tool_response>."
    )


def _call_block(call: dict[str, Any]) -> str:
    return f"{OPEN}\n{json.dumps({'name': call['name'], 'arguments': call['arguments']}, ensure_ascii=False)}\n{CLOSE}"


def render_tools(messages: list[dict[str, Any]], tools: list[Tool], chat_template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (assistant ones may carry ``tool_calls`` [{id, name, arguments}], role "tool" ones a result)
    and tools, as the template takes them: (messages, tools for the template or None)."""
    if template_renders_tools(chat_template):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out, [t.as_openai() for t in tools] or None
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = _text_of(m.get("content"))
            blocks = "\n".join(_call_block(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{_text_of(m.get('content'))}\n</tool_response>"})
        else:
            out.append(m)
    if tools:
        description = _describe(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{_text_of(out[0]['content'])}\n\n{description}"}
        else:
            out.insert(0, {"role": "system", "content": description})
    return out, None


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class ToolCallParser:
    """Splits streamed text into answer text and tool calls. ``feed`` returns (text, calls) that are final;
    the start of a possible ``<tool_call>`` is held back until it is known. A block that is not valid JSON of
    the form {"name": ..., "arguments": {...}} stays in the text, as the model wrote it."""

    def __init__(self, id_prefix: str = "call_") -> None:
        self._held = ""
        self._inside: str | None = None
        self._prefix = id_prefix
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        text, calls = [], []
        data = self._held + piece
        self._held = ""
        while data:
            if self._inside is None:
                start = data.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(data, OPEN)
                    text.append(data[: len(data) - keep])
                    self._held = data[len(data) - keep :]
                    break
                text.append(data[:start])
                self._inside, data = "", data[start + len(OPEN) :]
            else:
                buffer = self._inside + data  # the closing tag may straddle two pieces
                end = buffer.find(CLOSE)
                if end < 0:
                    self._inside = buffer
                    break
                body, data = buffer[:end], buffer[end + len(CLOSE) :]
                self._inside = None
                call = self._parse(body)
                if call is None:
                    text.append(f"{OPEN}{body}{CLOSE}")
                else:
                    calls.append(call)
        self.calls.extend(calls)
        return "".join(text), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of stream: an unclosed block is parsed as it stands (models sometimes stop before the tag)."""
        held, self._held = self._held, ""
        if self._inside is None:
            return held, []
        body, self._inside = self._inside, None
        call = self._parse(body[: len(body) - _partial_suffix(body, CLOSE)])
        if call is None:
            return f"{held}{OPEN}{body}", []
        self.calls.append(call)
        return held, [call]

    def _parse(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(new_call_id(self._prefix), value["name"], arguments)


def split_calls(parser: ToolCallParser | None, text: str, *, final: bool) -> tuple[str, list[ToolCall]]:
    """``text`` through ``parser`` (none: no tools, all text); ``final`` also flushes what it held back."""
    if parser is None:
        return text, []
    head, calls = parser.feed(text)
    if final:
        tail, more = parser.finish()
        head, calls = head + tail, calls + more
    return head, calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
