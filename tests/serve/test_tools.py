"""Tool calls: the Hermes/Qwen parser (streamed in any split equals whole), forced calls through the grammar,
and a full round trip with the OpenAI SDK: call, tool result fed back through the template, answer."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_serve.tools import ToolCallParser, ToolFormat, forced_call_grammar, tool_format_for

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}

SAMPLE = 'Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call> and <tool_call>{"name": "g", "arguments": "{\\"y\\": [2]}"}</tool_call><tool_call>not json</tool_call> end <tool'


def parse_whole(text: str):
    parser = ToolCallParser()
    head, calls = parser.feed(text)
    tail, more = parser.finish()
    return head + tail, [(c.name, c.arguments) for c in calls + more]


def test_parser_on_a_sample() -> None:
    text, calls = parse_whole(SAMPLE)
    assert calls == [("f", {"x": 1}), ("g", {"y": [2]})]
    assert text == "Sure. and <tool_call>not json</tool_call> end <tool"


def test_parser_unclosed_block_at_the_end() -> None:
    assert parse_whole('<tool_call>\n{"name": "f", "arguments": {}}') == ("", [("f", {})])
    assert parse_whole("<tool_call>\n{broken") == ("<tool_call>\n{broken", [])
    assert parse_whole('<tool_call>{"name": "f", "arguments": {}}\n</tool_c') == ("", [("f", {})])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=12))
def test_parser_streamed_in_any_pieces_equals_whole(cuts) -> None:
    points = sorted(set(cuts))
    pieces = [SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(SAMPLE)])]
    assert run_parser(ToolCallParser(), pieces) == parse_whole(SAMPLE)


def run_parser(parser, pieces):
    text, calls = "", []
    for piece in pieces:
        t, c = parser.feed(piece)
        text += t
        calls += c
    t, c = parser.finish()
    return text + t, [(x.name, x.arguments) for x in calls + c]


@pytest.mark.parametrize(
    "style, answer, expected",
    [
        (
            "mistral",
            '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{}"}]',
            ("", [("f", {"x": 1}), ("g", {})]),
        ),
        ("mistral", ' [{"name": "f", "arguments": {}}]', ("", [("f", {})])),  # the marker was decoded away
        ("mistral", "[1] is a citation", ("[1] is a citation", [])),
        ("mistral", "plain answer", ("plain answer", [])),
        (
            "pythonic",
            '[get_weather(city="Paris", unit="C"), now()]',
            ("", [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]),
        ),
        ("pythonic", "[f(1)]", ("[f(1)]", [])),  # positional arguments are not a call we can name
        ("pythonic", "[os.system('x')]", ("[os.system('x')]", [])),
        ("pythonic", "[f(x=open('y'))]", ("[f(x=open('y'))]", [])),  # only literal values
        ("pythonic", "Hello [there]", ("Hello [there]", [])),
        (
            "gemma",
            '```tool_code\nget_weather(city="Paris")\nprint(now())\n```',
            ("", [("get_weather", {"city": "Paris"}), ("now", {})]),
        ),
        ("gemma", "```tool_code\nimport os\n```", ("```tool_code\nimport os\n```", [])),
        ("gemma", "```python\nx = 1\n```", ("```python\nx = 1\n```", [])),
        ("gemma", "No call needed.", ("No call needed.", [])),
    ],
)
def test_whole_answer_formats(style, answer, expected) -> None:
    assert run_parser(ToolFormat(style).parser(), [answer]) == expected
    assert run_parser(ToolFormat(style).parser(), list(answer)) == expected  # one character at a time


def test_plain_text_streams_at_once_in_whole_answer_formats() -> None:
    parser = ToolFormat("pythonic").parser()
    assert parser.feed("Hi") == ("Hi", [])
    assert parser.feed(" there") == (" there", [])


def test_format_detection_and_forced_grammars() -> None:
    assert tool_format_for("{{ '[TOOL_CALLS]' }}").style == "mistral"
    assert tool_format_for("[func_name1(params_name1=params_value1)]").style == "pythonic"
    assert tool_format_for("{% for tool in tools %}<tool_call>").style == "hermes"
    assert tool_format_for(None).style == "hermes"
    assert tool_format_for("{{ '<start_of_turn>' + role }}").style == "gemma"
    from vlm_serve.tools import Tool

    tools = [Tool("f", "", {"type": "object"})]
    assert forced_call_grammar(tools, "required", "mistral") and forced_call_grammar(tools, "auto", "mistral") is None
    from vlm_serve.errors import APIError

    with pytest.raises(APIError, match="pythonic"):
        forced_call_grammar(tools, "f", "pythonic")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)


def test_named_tool_choice_forces_a_valid_call(server, client) -> None:
    response = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_streams_a_call_of_some_tool(server, client) -> None:
    chunks = list(
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "Do something"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=200,
            temperature=0.9,
            seed=5,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(json.loads(deltas[0].function.arguments), schemas[deltas[0].function.name])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_round_trip_with_the_tool_result(server, client) -> None:
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(
        model=server.model_id, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    replies = []
    for result in ("sunny", "heavy snow with strong winds from the north all day long"):
        convo = [*messages, {"role": "tool", "tool_call_id": call.id, "content": result}]
        replies.append(
            client.chat.completions.create(model=server.model_id, messages=convo, tools=[WEATHER], max_tokens=8)
        )
    # The call and the result are in the prompt: it grows with the call and with the longer result.
    assert replies[0].usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 4
    assert replies[1].usage.prompt_tokens > replies[0].usage.prompt_tokens + 8
    assert all(r.choices[0].finish_reason in ("stop", "length", "tool_calls") for r in replies)


def test_bad_tool_requests(server) -> None:
    import httpx

    base = {"model": server.model_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra, says in [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "name"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot be combined",
        ),
    ]:
        response = httpx.post(f"{server.base}/chat/completions", json={**base, **extra}, timeout=30)
        assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Oslo"}}],
    },
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
]
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_templates_that_render_tools_get_them_as_they_are(loaded_model) -> None:
    import copy

    from vlm_models import apply_chat_template
    from vlm_serve.tools import Tool, render_tools

    processor = copy.copy(loaded_model[1])
    processor.chat_template = NATIVE_TEMPLATE
    tools = [Tool("get_weather", "weather", WEATHER["function"]["parameters"])]
    messages, for_template = render_tools(CONVERSATION, tools, NATIVE_TEMPLATE)
    prompt = apply_chat_template(processor, None, messages, tools=for_template)
    assert "TOOLS:get_weather;" in prompt
    assert '<|im_start|>assistant\n<tool_call>get_weather{"city": "Oslo"}</tool_call>' in prompt
    assert "<|im_start|>tool\nsunny<|im_end|>" in prompt


def test_templates_without_tools_get_a_description_and_tagged_turns(loaded_model) -> None:
    from vlm_models import apply_chat_template
    from vlm_serve.tools import Tool, render_tools

    processor = loaded_model[1]
    tools = [Tool("get_weather", "weather", WEATHER["function"]["parameters"])]
    messages, for_template = render_tools(CONVERSATION, tools, processor.chat_template)
    assert for_template is None
    prompt = apply_chat_template(processor, None, messages)
    definition = json.dumps(tools[0].as_openai())
    assert prompt.startswith("<|im_start|>system\n") and f"<tools>\n{definition}\n</tools>" in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt


def test_gemma_conversation_round_trip_renders_in_its_own_blocks() -> None:
    """Without a template that renders tools, Gemma's calls and results are written as tool_code / tool_output
    blocks, and what it answers in that format parses back to the same call."""
    from vlm_serve.tools import Tool, render_tools

    template = "{% for m in messages %}<start_of_turn>{{ m['role'] }}{% endfor %}"
    tools = [Tool("get_weather", "weather now", {"type": "object", "properties": {"city": {"type": "string"}}})]
    call = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
    ]
    rendered, template_tools = render_tools(messages, tools, template)
    assert template_tools is None and "```tool_code" in rendered[0]["content"]
    assert rendered[2]["content"] == "```tool_code\nget_weather(city='Paris')\n```"
    assert rendered[3] == {"role": "user", "content": "```tool_output\nsunny\n```"}
    assert run_parser(ToolFormat("gemma").parser(), [rendered[2]["content"]]) == (
        "",
        [("get_weather", {"city": "Paris"})],
    )
