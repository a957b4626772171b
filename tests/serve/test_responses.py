"""The Responses API with the OpenAI SDK: instructions, previous_response_id, streaming events, tools,
structured output, and the store's bound and expiry."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from vlm_models import apply_chat_template
from vlm_runtime import generate
from vlm_serve.responses_api import ResponseStore


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)


def reference(loaded_model, messages, **options) -> str:
    model, processor = loaded_model
    return generate(model, processor, apply_chat_template(processor, None, messages), **options).text


def test_create_with_instructions(server, client, loaded_model) -> None:
    response = client.responses.create(
        model=server.model_id, instructions="Be terse.", input="Hello there", max_output_tokens=7
    )
    expected = reference(
        loaded_model,
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}],
        max_tokens=7,
    )
    assert response.output_text == expected
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 7 and response.id.startswith("resp_")


def test_previous_response_id_continues_the_conversation(server, client, loaded_model) -> None:
    first = client.responses.create(model=server.model_id, input="My name is Ada.", max_output_tokens=5)
    second = client.responses.create(
        model=server.model_id, input="What is my name?", previous_response_id=first.id, max_output_tokens=6
    )
    expected = reference(
        loaded_model,
        [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        max_tokens=6,
    )
    assert second.output_text == expected
    assert second.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=server.model_id, input="x", previous_response_id="resp_missing", max_output_tokens=2
        )
    unstored = client.responses.create(model=server.model_id, input="forget me", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=server.model_id, input="x", previous_response_id=unstored.id, max_output_tokens=2)


def test_streaming_event_sequence(server, client, loaded_model) -> None:
    events = list(
        client.responses.create(model=server.model_id, input="Stream please", max_output_tokens=6, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == reference(loaded_model, [{"role": "user", "content": "Stream please"}], max_tokens=6)
    assert events[-1].response.output_text == text


def test_function_call_and_output(server, client) -> None:
    tool = {
        "type": "function",
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "maxLength": 8}},
            "required": ["word"],
            "additionalProperties": False,
        },
    }
    first = client.responses.create(
        model=server.model_id, input="Define 'cat'", tools=[tool], tool_choice="required", max_output_tokens=200
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    follow = client.responses.create(
        model=server.model_id,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "a small domesticated feline"}],
        tools=[tool],
        max_output_tokens=4,
    )
    assert follow.usage.input_tokens > first.usage.input_tokens


def test_text_format_json_schema(server, client) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=server.model_id,
        input="a digit",
        text={"format": {"type": "json_schema", "name": "digit", "schema": schema, "strict": True}},
        max_output_tokens=60,
    )
    jsonschema.validate(json.loads(response.output_text), schema)


def test_store_bound_and_expiry(monkeypatch) -> None:
    store = ResponseStore(max_entries=2, ttl_s=10)
    clock = [100.0]
    monkeypatch.setattr("vlm_serve.responses_api.time.monotonic", lambda: clock[0])
    for name in ("a", "b", "c"):
        store.put(name, [{"role": "user", "content": name}], [])
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    clock[0] += 11
    assert store.get("c") is None and len(store) == 0
