"""Gemma 4's tool-call format: what its template writes for a call parses back to the same call, streamed or
whole, with or without the special marks (decoding may drop them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import load
from vlm_serve.tools import ToolFormat, parse_gemma4_calls, split_calls, tool_format_for

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "gemma4" / "hub"


@pytest.fixture(scope="module")
def processor():
    return load(CHECKPOINT)[1]


def rendered_call(processor, name: str, arguments: dict) -> str:
    """The assistant turn the checkpoint's template writes for one call, marks and all."""
    messages = [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": arguments}}]},
    ]
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False)
    return text.split("<|turn>model\n", 1)[1].removesuffix("<turn|>\n")


def test_the_template_names_the_format(processor) -> None:
    assert tool_format_for(processor.chat_template).style == "gemma4"


def test_values_of_every_kind() -> None:
    text = (
        '<|tool_call>call:get_weather{location:<|"|>Paris, {FR}<|"|>,days:3,opts:{unit:<|"|>C<|"|>,alerts:true},'
        'tags:[<|"|>a<|"|>,2.5,null]}<tool_call|><|tool_call>call:noop{}<tool_call|>'
    )
    assert parse_gemma4_calls(text) == [
        (
            "get_weather",
            {"location": "Paris, {FR}", "days": 3, "opts": {"unit": "C", "alerts": True}, "tags": ["a", 2.5, None]},
        ),
        ("noop", {}),
    ]
    assert parse_gemma4_calls("call:get_weather{location:Paris,days:3}") == [
        ("get_weather", {"location": "Paris", "days": 3})
    ]
    for not_calls in ("Sure, here you go.", 'call:f{a:<|"|>open', "call:{a:1}", ""):
        assert parse_gemma4_calls(not_calls) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text("abc ,:{}[]xyz", min_size=1, max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["k", "v", "w"]), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(arguments=st.dictionaries(st.sampled_from(["city", "count", "flags", "nested"]), json_values, max_size=4))
def test_what_the_template_writes_parses_back(processor, arguments) -> None:
    """Streamed in pieces of three characters through the server's parser: one call, no text left."""
    text = rendered_call(processor, "lookup", arguments)
    parser = ToolFormat("gemma4").parser()
    answer, calls = "", []
    for i in range(0, len(text), 3):
        piece, found = parser.feed(text[i : i + 3])
        answer, calls = answer + piece, calls + found
    tail, more = split_calls(parser, "", final=True)
    assert answer + tail == ""
    assert [(c.name, c.arguments) for c in calls + more] == [("lookup", arguments)]


def test_plain_answers_stream_as_text() -> None:
    parser = ToolFormat("gemma4").parser()
    text, calls = parser.feed("The weather is fine.")
    assert (text, calls) == ("The weather is fine.", [])
