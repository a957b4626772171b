"""Qwen3.5's tool-call format (the XML calls Qwen3-Coder introduced): detected from the chat template, parsed out of
streamed text in any split (argument values typed by the tool's schema), forced by a grammar when the request asks
for a call, and written back into the conversation by the template; end to end on the tiny Qwen3.5 fixture."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import llguidance
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import apply_chat_template
from vlm_serve.grammar import GrammarFactory
from vlm_serve.tools import Tool, ToolFormat, forced_call_grammar, render_tools, tool_format_for

from .conftest import CONTEXT, Server, start
from .test_tools import TIME, WEATHER, run_parser

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "qwen3_5" / "hf5"
TOOLS = tuple(
    Tool(t["function"]["name"], t["function"].get("description", ""), t["function"]["parameters"])
    for t in (WEATHER, TIME)
)
SAMPLE = (
    "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
    "<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
    "<parameter=zone>\n-5\n</parameter>\n</function>\n</tool_call><tool_call>no function</tool_call> <tool_"
)


def test_the_fixture_template_speaks_xml() -> None:
    assert tool_format_for((MODEL / "chat_template.jinja").read_text()).style == "xml"
    assert tool_format_for("{{ '<tool_call>' }}{{ tool | tojson }}").style == "hermes"


def test_xml_calls_are_parsed_and_typed() -> None:
    text, calls = run_parser(ToolFormat("xml", TOOLS).parser(), [SAMPLE])
    assert calls == [("get_weather", {"city": "New York", "unit": "C"}), ("get_time", {"zone": -5})]
    assert text == "Let me check.\n\n\n<tool_call>no function</tool_call> <tool_"
    # Without the schema, values stay text unless they are JSON objects or arrays; multi-line values are kept.
    body = '<tool_call>\n<function=f>\n<parameter=n>\n007\n</parameter>\n<parameter=o>\n{"a": [1]}\n</parameter>\n'
    body += "<parameter=s>\nline one\nline two\n</parameter>\n</function>\n</tool_call>"
    assert run_parser(ToolFormat("xml").parser(), [body])[1] == [
        ("f", {"n": "007", "o": {"a": [1]}, "s": "line one\nline two"})
    ]
    # A call cut off before its closing tags is still read at the end of the stream.
    assert run_parser(ToolFormat("xml").parser(), ["<tool_call>\n<function=g>\n<parameter=x>\n1\n</parameter>\n"])[
        1
    ] == [("g", {"x": "1"})]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=12))
def test_streamed_in_any_pieces_equals_whole(cuts) -> None:
    points = sorted(set(cuts))
    pieces = [SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(SAMPLE)])]
    assert run_parser(ToolFormat("xml", TOOLS).parser(), pieces) == run_parser(
        ToolFormat("xml", TOOLS).parser(), [SAMPLE]
    )


@pytest.fixture(scope="module")
def loaded():
    from vlm_models import load

    return load(MODEL)


def accepts(processor, grammar: str, text: str) -> bool:
    """Whether ``grammar`` admits exactly ``text`` in the model's tokens (``<tool_call>`` is one of them)."""
    tokenizer = GrammarFactory(processor).tokenizer()
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.tokenize_bytes(text.encode())
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def call(name: str, **arguments: str) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def test_forced_grammar_admits_valid_calls_only(loaded) -> None:
    """The required parameters, in the schema's order, with values its schema admits (an enum's members, a string
    within maxLength, an integer within bounds)."""
    _, processor = loaded
    assert forced_call_grammar(list(TOOLS), "auto", "xml") is None
    weather = forced_call_grammar(list(TOOLS), "get_weather", "xml", tags_are_tokens=True)
    assert accepts(processor, weather, call("get_weather", city="Paris", unit="F"))
    assert not accepts(processor, weather, call("get_weather", city="Paris", unit="K"))  # not in the enum
    assert not accepts(processor, weather, call("get_weather", city="Paris"))  # a required argument missing
    assert not accepts(processor, weather, call("get_weather", city="A city name far too long", unit="C"))
    assert not accepts(processor, weather, call("get_time", zone="3"))  # another tool
    either = forced_call_grammar(list(TOOLS), "required", "xml", tags_are_tokens=True)
    assert accepts(processor, either, call("get_time", zone="-5"))
    assert not accepts(processor, either, call("get_time", zone="20"))  # above the maximum
    assert not accepts(processor, either, "Sure: " + call("get_time", zone="1"))


# -- end to end


@pytest.fixture(scope="module")
def server(loaded):
    from vlm_serve import ModelHost, ServeSettings, create_app

    settings_ = ServeSettings(model=str(MODEL), context_length=CONTEXT)
    model, processor = loaded
    engine = ModelHost.from_model(str(MODEL), model, processor, settings_, context_length=CONTEXT)
    running, thread, url = start(create_app(engine, settings_))
    try:
        yield Server(url, str(MODEL), (model, processor))
    finally:
        running.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)


def test_named_tool_choice_forces_a_valid_xml_call(server, client) -> None:
    for tool, stream in ((WEATHER, False), (TIME, True)):
        name = tool["function"]["name"]
        response = client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "Please help."}],
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": name}},
            max_tokens=120,
            stream=stream,
        )
        if stream:
            chunks = list(response)
            (call,) = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            (call,) = response.choices[0].message.tool_calls
            finish = [response.choices[0].finish_reason]
        assert finish == ["tool_calls"] and call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_the_template_writes_calls_and_results_back(server) -> None:
    _, processor = server.app
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    rendered, tools = render_tools(messages, list(TOOLS), processor.chat_template)
    prompt = apply_chat_template(processor, None, rendered, tools=tools)
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>"
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt
    assert '"name": "get_time"' in prompt  # the definitions, in the system turn
