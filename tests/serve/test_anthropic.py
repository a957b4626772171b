"""The Anthropic SDK against a real server: messages, streaming events, images, stop sequences, count_tokens."""

from __future__ import annotations

import base64

import anthropic
import httpx
import pytest

from vlm_models import apply_chat_template
from vlm_runtime import generate

from .conftest import IMAGES


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def reference(loaded_model, messages, *, image=None, **options) -> str:
    model, processor = loaded_model
    return generate(model, processor, apply_chat_template(processor, None, messages), image=image, **options).text


def test_message_with_system_and_image(server, client, loaded_model) -> None:
    png = IMAGES / "rgb_112x168.png"
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png.read_bytes()).decode()},
    }
    message = client.messages.create(
        model=server.model_id,
        max_tokens=9,
        system=[{"type": "text", "text": "You describe images."}],
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "Describe."}]}],
    )
    expected = reference(
        loaded_model,
        [
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        ],
        image=str(png),
        max_tokens=9,
    )
    assert message.content[0].type == "text" and message.content[0].text == expected
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 9
    assert message.role == "assistant" and message.id.startswith("msg_")


def test_streaming_event_sequence(server, client, loaded_model) -> None:
    messages = [{"role": "user", "content": "Stream to me"}]
    with client.messages.stream(model=server.model_id, max_tokens=8, messages=messages) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    raw = [k for k in kinds if k not in ("text", "content_block")]  # the SDK adds its own helper events
    assert raw[0] == "message_start" and raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == reference(loaded_model, messages, max_tokens=8)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8


def test_stop_sequence_reported(server, client, loaded_model) -> None:
    messages = [{"role": "user", "content": "Stop somewhere"}]
    full = reference(loaded_model, messages, max_tokens=12)
    stop = full[4:6]
    message = client.messages.create(model=server.model_id, max_tokens=12, messages=messages, stop_sequences=[stop])
    assert message.content[0].text == full[: full.index(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_count_tokens(server, client, loaded_model) -> None:
    processor = loaded_model[1]
    messages = [{"role": "user", "content": "count me"}]
    counted = client.messages.count_tokens(model=server.model_id, messages=messages, system="sys")
    prompt = apply_chat_template(processor, None, [{"role": "system", "content": "sys"}, *messages])
    assert counted.input_tokens == len(processor.encode(prompt))


def test_errors_in_anthropic_shape(server) -> None:
    response = httpx.post(
        f"{server.url}/v1/messages",
        json={"model": server.model_id, "messages": []},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


WEATHER = {
    "name": "get_weather",
    "description": "Current weather",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_tool_use_round_trip(server, client) -> None:
    import jsonschema

    messages = [{"role": "user", "content": "Weather in Rome?"}]
    first = client.messages.create(
        model=server.model_id,
        max_tokens=200,
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny and warm"}]},
    ]
    reply = client.messages.create(model=server.model_id, max_tokens=6, messages=messages, tools=[WEATHER])

    def prompt(usage) -> int:  # tokens read from the prefix cache are reported apart
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)

    assert prompt(reply.usage) > prompt(first.usage)
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_tool_use_streaming(server, client) -> None:
    import jsonschema

    with client.messages.stream(
        model=server.model_id,
        max_tokens=200,
        messages=[{"role": "user", "content": "go"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds or "content_block_delta" in kinds
    (use,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER["input_schema"])
    assert final.stop_reason == "tool_use"


def test_prefix_cache_reads_are_reported_apart(server, client) -> None:
    """A prompt sent again is read from the prefix cache: Anthropic's usage counts those tokens in
    cache_read_input_tokens, not in input_tokens, in both the message and the stream's last delta."""
    text = "Repeat after me: " + "the quick brown fox jumps over the lazy dog. " * 6
    messages = [{"role": "user", "content": text}]
    first = client.messages.create(model=server.model_id, max_tokens=3, messages=messages)
    again = client.messages.create(model=server.model_id, max_tokens=3, messages=messages)
    total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total
    with client.messages.stream(model=server.model_id, max_tokens=3, messages=messages) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == total
