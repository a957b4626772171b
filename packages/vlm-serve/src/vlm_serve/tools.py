"""Tool calling: definitions into the prompt, calls out of the generated text (streamed or not), and a grammar
that forces a call when the request says so.

Five output formats, chosen from the checkpoint's chat template: Hermes / Qwen ``<tool_call>{json}</tool_call>``
blocks (the default), the XML calls of Qwen3-Coder and Qwen3.5 (``<tool_call>`` around ``<function=name>`` and one
``<parameter=name>`` block per argument, values as text), Mistral's ``[TOOL_CALLS][{json}, ...]``, the pythonic
``[f(x=1), g()]`` of Llama 3.2+, Gemma's fenced ``tool_code`` block of Python calls (results in a ``tool_output``
block), as Google's Gemma function-calling guide prompts it, and Gemma 4's
``<|tool_call>call:name{key:value,...}<tool_call|>`` (strings between ``<|"|>`` marks).

Templates that render tools themselves (Qwen2.5's, Hermes') get the definitions and the tool messages as they
are; for templates that do not, the tools are described in a system message and calls/results are written in
the same tags, so the conversation still reads the way the model family was trained on.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance

from .errors import APIError
from .grammar import JSON_LAYOUT

__all__ = [
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolFormat",
    "WholeAnswerCallParser",
    "forced_call_grammar",
    "render_tools",
    "resolve_choice",
    "split_calls",
    "tool_format_for",
    "xml_call_parser",
]

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


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


def _call_schema(tools: list[Tool], choice: str) -> dict[str, Any]:
    """The JSON schema of one call of an allowed tool: {"name": <that tool>, "arguments": <its schema>}."""
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
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _xml_value_rule(name: str, schema: dict[str, Any]) -> str:
    """A lark rule for one XML parameter value: JSON text under the property's schema, or plain text for strings
    (one line without ``<``, within maxLength; or one of its enum values)."""
    if schema.get("type") == "string" or (schema.get("enum") and all(isinstance(v, str) for v in schema["enum"])):
        if schema.get("enum"):
            return f"{name}: " + " | ".join(json.dumps(v) for v in schema["enum"])
        bound = f"{{{int(schema.get('minLength', 0))},{int(schema['maxLength'])}}}" if "maxLength" in schema else "*"
        return f"{name}: /[^<\\n]{bound}/"
    return f"{name}: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"


def _tags(as_tokens: bool) -> tuple[str, str]:
    """The lark for ``<tool_call>`` and ``</tool_call>``: the tokens themselves where the tokenizer has them (the
    published Qwen tokenizers do; llguidance keeps such tokens apart from text), else the text."""
    if as_tokens:
        return OPEN, CLOSE
    return json.dumps(OPEN), json.dumps(CLOSE)


def _xml_call_grammar(tools: list[Tool], choice: str, tags_are_tokens: bool) -> str:
    """One XML call of an allowed tool: its parameters in the schema's order, the required ones present."""
    rules, calls = [], []
    for t, tool in enumerate(t for t in tools if choice == "required" or t.name == choice):
        properties = (tool.parameters or {}).get("properties") or {}
        required = set((tool.parameters or {}).get("required") or ())
        parts = []
        for p, (name, schema) in enumerate(properties.items()):
            value = f"v{t}_{p}"
            rules.append(_xml_value_rule(value, schema if isinstance(schema, dict) else {}))
            block = f"{json.dumps(f'{XML_PARAMETER}{name}>' + chr(10))} {value} {json.dumps(chr(10) + '</parameter>' + chr(10))}"
            parts.append(block if name in required else f"({block})?")
        opening, closing = _tags(tags_are_tokens)
        head = f"{opening} {json.dumps(f'{chr(10)}{XML_FUNCTION}{tool.name}>{chr(10)}')}"
        calls.append(f"{head} {' '.join(parts)} {json.dumps('</function>' + chr(10))} {closing}")
    return "start: " + " | ".join(f"({c})" for c in calls) + "\n" + "\n".join(rules) + "\n"


def forced_call_grammar(
    tools: list[Tool], choice: str, style: str = "hermes", tags_are_tokens: bool = False
) -> str | None:
    """For "required" or a named tool: a grammar that admits exactly one call of an allowed tool, with
    arguments valid under that tool's schema, in the model's format. None for "auto". ``tags_are_tokens``: the
    tokenizer has ``<tool_call>`` and ``</tool_call>`` as tokens of their own."""
    if choice in ("auto", "none"):
        return None
    if style == "xml":
        return llguidance.LLMatcher.grammar_from_lark(_xml_call_grammar(tools, choice, tags_are_tokens))
    schema = _call_schema(tools, choice)
    if style == "hermes":
        schema = {**schema, "x-guidance": JSON_LAYOUT}
        opening, closing = _tags(tags_are_tokens)
        newline = json.dumps(chr(10))
        lark = f"start: {opening} {newline} call {newline} {closing}\ncall: %json {json.dumps(schema)}\n"
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if style == "mistral":  # the [TOOL_CALLS] marker is a control token: the list of calls follows it
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "array", "items": schema, "minItems": 1, "maxItems": 1}, defaults=JSON_LAYOUT
        )
    raise APIError(
        400, f"tool_choice {choice!r} cannot be enforced for this model's {style} tool-call format", param="tool_choice"
    )


def template_renders_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def _describe(tools: list[Tool], style: str) -> str:
    lines = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    if style == "gemma":
        return (
            "You can call functions. Their definitions, one JSON object per line:\n"
            f"{lines}\n"
            f"To call them, answer with only {GEMMA_OPEN}\n"
            "function_name(argument=value, ...)\n"
            f"{GEMMA_CLOSE} (one call per line, Python keyword arguments with literal values). "
            f"Results come back in a {GEMMA_RESULT} block."
        )
    return (
        "You can call functions. Their definitions, one JSON object per line:\n"
        f"<tools>\n{lines}\n</tools>\n"
        f"To call one, answer with {OPEN}\n"
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
        f"{CLOSE} (one block per call). Results come back inside <tool_response></tool_response>."
    )


def _call_blocks(calls: list[dict[str, Any]], style: str) -> str:
    if style == "gemma":
        lines = (f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['arguments'].items())})" for c in calls)
        return f"{GEMMA_OPEN}\n" + "\n".join(lines) + f"\n{GEMMA_CLOSE}"
    return "\n".join(
        f"{OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']}, ensure_ascii=False)}\n{CLOSE}"
        for c in calls
    )


def _result_message(content: Any, style: str) -> dict[str, Any]:
    if style == "gemma":
        return {"role": "user", "content": f"{GEMMA_RESULT}\n{_text_of(content)}\n{GEMMA_CLOSE}"}
    return {"role": "user", "content": f"<tool_response>\n{_text_of(content)}\n</tool_response>"}


def render_tools(
    messages: list[dict[str, Any]], tools: list[Tool], chat_template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (assistant ones may carry ``tool_calls`` [{id, name, arguments}], role "tool" ones a result)
    and tools, as the template takes them: (messages, tools for the template or None)."""
    if template_renders_tools(chat_template):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [
                    {"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in m["tool_calls"]
                ]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out, [t.as_openai() for t in tools] or None
    style = tool_format_for(chat_template).style
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = _text_of(m.get("content"))
            blocks = _call_blocks(m["tool_calls"], style)
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        elif m["role"] == "tool":
            out.append(_result_message(m.get("content"), style))
        else:
            out.append(m)
    if tools:
        description = _describe(tools, style)
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
    the start of a possible ``<tool_call>`` is held back until it is known. A block that does not parse (as JSON
    of the form {"name": ..., "arguments": {...}}, or with ``parse_body`` where given) stays in the text, as the
    model wrote it."""

    def __init__(
        self, id_prefix: str = "call_", parse_body: Callable[[str], tuple[str, dict[str, Any]] | None] | None = None
    ) -> None:
        self._held = ""
        self._inside: str | None = None
        self._prefix = id_prefix
        self._parse_body = parse_body or _json_call
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
        call = self._parse_body(body)
        return ToolCall(new_call_id(self._prefix), *call) if call is not None else None


def _json_call(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        return _name_and_arguments(json.loads(body))
    except json.JSONDecodeError:
        return None


XML_FUNCTION, XML_PARAMETER = "<function=", "<parameter="
_XML_CALL = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?\Z", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def xml_call_parser(tools: tuple[Tool, ...] = ()) -> Callable[[str], tuple[str, dict[str, Any]] | None]:
    """Reads the body of one XML call; values are text, turned into the type the tool's schema gives the argument
    (untyped ones: JSON objects and arrays decoded, anything else kept as text)."""
    schemas = {t.name: ((t.parameters or {}).get("properties") or {}) for t in tools}

    def parse(body: str) -> tuple[str, dict[str, Any]] | None:
        match = _XML_CALL.match(body)
        if match is None:
            return None
        name, inner = match[1].strip(), match[2]
        properties = schemas.get(name, {})
        arguments = {}
        for key, text in _XML_PARAMETER.findall(inner):
            schema = properties.get(key.strip())
            arguments[key.strip()] = _typed(text, schema if isinstance(schema, dict) else None)
        return name, arguments

    return parse


def _typed(text: str, schema: dict[str, Any] | None) -> Any:
    kind = schema.get("type") if schema else None
    if kind == "string":
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if kind is None and not isinstance(value, (dict, list)):
        return text  # "007" stays the text it is unless the schema says it is a number
    return value


def split_calls(parser: CallParser | None, text: str, *, final: bool) -> tuple[str, list[ToolCall]]:
    """``text`` through ``parser`` (none: no tools, all text); ``final`` also flushes what it held back."""
    if parser is None:
        return text, []
    head, calls = parser.feed(text)
    if final:
        tail, more = parser.finish()
        head, calls = head + tail, calls + more
    return head, calls


class CallParser(Protocol):
    calls: list[ToolCall]

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]: ...

    def finish(self) -> tuple[str, list[ToolCall]]: ...


class WholeAnswerCallParser:
    """For formats where the whole answer is the list of calls (Mistral, pythonic): an answer whose first
    non-blank text starts with ``opener`` is held back and parsed at the end; any other answer is plain text,
    streamed as it comes. An answer that does not parse stays text."""

    def __init__(
        self,
        opener: str | tuple[str, ...],
        parse: Callable[[str], list[tuple[str, dict[str, Any]]] | None],
        id_prefix: str = "call_",
    ) -> None:
        self._openers = (opener,) if isinstance(opener, str) else opener
        self._parse, self._prefix = parse, id_prefix
        self._buffer = ""
        self._mode: str | None = None  # None: undecided, "text", "calls"
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        if self._mode == "text":
            return piece, []
        self._buffer += piece
        start = self._buffer.lstrip()
        if self._mode is None and start:
            if start.startswith(self._openers):
                self._mode = "calls"
            elif not any(opener.startswith(start) for opener in self._openers):
                self._mode = "text"
                text, self._buffer = self._buffer, ""
                return text, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buffer = self._buffer, ""
        if self._mode != "calls":
            return text, []
        parsed = self._parse(text.strip())
        if not parsed:
            return text, []
        calls = [ToolCall(new_call_id(self._prefix), name, arguments) for name, arguments in parsed]
        self.calls.extend(calls)
        return "", calls


MISTRAL_MARKER = "[TOOL_CALLS]"


def parse_json_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """Mistral's list of {"name": ..., "arguments": {...}} (one bare object is accepted too)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = [_name_and_arguments(item) for item in (value if isinstance(value, list) else [value])]
    return None if not calls or None in calls else calls  # type: ignore[return-value]


def _name_and_arguments(value: Any) -> tuple[str, dict[str, Any]] | None:
    """{"name": str, "arguments": {...}} (arguments may be a JSON string, or be called "parameters")."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def parse_pythonic_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``[f(a=1, b="x"), g()]``: a list of calls with keyword arguments whose values are Python literals."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return None
        if len(arguments) != len(node.keywords):
            return None
        calls.append((node.func.id, arguments))
    return calls


GEMMA_OPEN, GEMMA_CLOSE, GEMMA_RESULT = "```tool_code", "```", "```tool_output"


def parse_tool_code_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """Gemma's fenced block: one Python call per line (``print(f(x=1))`` is read as ``f(x=1)``)."""
    if not text.startswith(GEMMA_OPEN):
        return None
    body = text[len(GEMMA_OPEN) :].rstrip()
    if body.endswith(GEMMA_CLOSE):
        body = body[: -len(GEMMA_CLOSE)]
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    unwrapped = [
        line[len("print(") : -1] if line.startswith("print(") and line.endswith(")") else line for line in lines
    ]
    return parse_pythonic_calls("[" + ", ".join(unwrapped) + "]") if unwrapped else None


GEMMA4_OPEN, GEMMA4_CLOSE, GEMMA4_QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


def parse_gemma4_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """Gemma 4's calls, ``<|tool_call>call:name{key:value,...}<tool_call|>`` one after another (the marks may be
    missing where decoding dropped them as special tokens); None unless the whole text is calls."""
    calls, rest = [], text.strip()
    while rest:
        rest = rest.removeprefix(GEMMA4_OPEN).lstrip()
        if not rest.startswith("call:") or "{" not in rest:
            return None
        name, _, body = rest[len("call:") :].partition("{")
        name = name.strip()
        try:
            arguments, end = _gemma4_value("{" + body, 0)
        except ValueError:
            return None
        if not name or not isinstance(arguments, dict):
            return None
        calls.append((name, arguments))
        rest = ("{" + body)[end:].lstrip().removeprefix(GEMMA4_CLOSE).lstrip()
    return calls or None


def _gemma4_value(text: str, i: int) -> tuple[Any, int]:
    """The value starting at ``text[i]`` and where it ends: a ``<|"|>`` string, an object (bare or quoted keys),
    an array, or a bare literal (JSON's numbers, true/false/null, None; other bare text is a string)."""
    if text.startswith(GEMMA4_QUOTE, i):
        end = text.find(GEMMA4_QUOTE, i + len(GEMMA4_QUOTE))
        if end < 0:
            raise ValueError("unterminated string")
        return text[i + len(GEMMA4_QUOTE) : end], end + len(GEMMA4_QUOTE)
    if text.startswith(("{", "["), i):
        closing, items, i = "}" if text[i] == "{" else "]", [], i + 1
        while True:
            if i >= len(text):
                raise ValueError("unterminated object")
            if text[i] == closing:
                break
            if text[i] == ",":
                i += 1
                continue
            if closing == "}":
                if text.startswith(GEMMA4_QUOTE, i):
                    key, i = _gemma4_value(text, i)
                else:
                    colon = text.find(":", i)
                    if colon < 0:
                        raise ValueError("a key without a value")
                    key, i = text[i:colon].strip(), colon
                if not text.startswith(":", i):
                    raise ValueError("a key without a value")
                value, i = _gemma4_value(text, i + 1)
                items.append((key, value))
            else:
                value, i = _gemma4_value(text, i)
                items.append(value)
        return (dict(items) if closing == "}" else items), i + 1
    end = i
    while end < len(text) and text[end] not in ",}]":
        end += 1
    bare = text[i:end].strip()
    if bare == "None":  # the template writes a null as Python spells it
        return None, end
    try:
        return json.loads(bare), end
    except json.JSONDecodeError:
        return bare, end


@dataclass(frozen=True)
class ToolFormat:
    style: str
    """"hermes", "xml", "mistral", "pythonic", "gemma" or "gemma4"."""
    tools: tuple[Tool, ...] = ()
    """The request's tools: the XML format types the argument values by their schemas."""
    tags_are_tokens: bool = False
    """The tokenizer has ``<tool_call>`` / ``</tool_call>`` as tokens of their own (forced calls emit those)."""

    def parser(self, id_prefix: str = "call_") -> CallParser:
        if self.style == "xml":
            return ToolCallParser(id_prefix, xml_call_parser(self.tools))
        if self.style == "mistral":
            # The marker is a special token that decoding usually drops; the answer then starts with the list.
            return _MistralParser(id_prefix)
        if self.style == "pythonic":
            return WholeAnswerCallParser("[", parse_pythonic_calls, id_prefix)
        if self.style == "gemma":
            return WholeAnswerCallParser(GEMMA_OPEN, parse_tool_code_calls, id_prefix)
        if self.style == "gemma4":
            return WholeAnswerCallParser((GEMMA4_OPEN, "call:"), parse_gemma4_calls, id_prefix)
        return ToolCallParser(id_prefix)

    def forced_grammar(self, tools: list[Tool], choice: str) -> str | None:
        return forced_call_grammar(tools, choice, self.style, self.tags_are_tokens)


class _MistralParser(WholeAnswerCallParser):
    def __init__(self, id_prefix: str) -> None:
        super().__init__("[", self._parse_marked, id_prefix)

    @staticmethod
    def _parse_marked(text: str) -> list[tuple[str, dict[str, Any]]] | None:
        return parse_json_calls(text[len(MISTRAL_MARKER) :] if text.startswith(MISTRAL_MARKER) else text)


def tool_format_for(chat_template: str | None) -> ToolFormat:
    """The tool-call format a checkpoint's template speaks (Hermes / Qwen when it says nothing else)."""
    template = chat_template or ""
    if GEMMA4_OPEN in template:
        return ToolFormat("gemma4")
    if MISTRAL_MARKER in template:
        return ToolFormat("mistral")
    if "func_name1(" in template or "[func_name(" in template:  # how Llama 3.2+ templates spell the format
        return ToolFormat("pythonic")
    if "<start_of_turn>" in template:  # Gemma's templates render no tools; its guide prompts tool_code blocks
        return ToolFormat("gemma")
    if XML_FUNCTION in template and XML_PARAMETER in template:  # Qwen3-Coder, Qwen3.5
        return ToolFormat("xml")
    return ToolFormat("hermes")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
