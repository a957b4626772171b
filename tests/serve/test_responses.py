"""The Responses API with the OpenAI SDK: instructions, previous_response_id, streaming events, tools,
structured output, and the store's bound and expiry."""

from __future__ import annotations

import base64
import io
import json

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert store.get("c") is None and len(store) == 0 and store.bytes == 0


def stored_size(messages, images) -> int:
    return len(json.dumps(messages, ensure_ascii=False).encode()) + sum(len(i.encode()) for i in set(images))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=300), st.lists(st.sampled_from(["data:a" * 40, "data:b" * 90, "u" * 7]), max_size=4)
        ),
        max_size=40,
    ),
    st.integers(1, 2000),
)
def test_the_byte_cap_holds_and_media_are_counted_once(turns, cap) -> None:
    store = ResponseStore(max_bytes=cap, max_entries=1000)
    kept = {}
    for index, (text, images) in enumerate(turns):
        messages = [{"role": "user", "content": text}]
        if store.put(str(index), messages, images):
            kept[str(index)] = (messages, images)
        else:
            assert stored_size(messages, images) > cap  # refused only when it alone is too large
        assert store.bytes <= cap
    alive = {k: v for k, v in kept.items() if store.get(k) is not None}
    assert all(store.get(k) == (v[0], v[1]) for k, v in alive.items())
    media = {i for _, images in alive.values() for i in images}
    text = sum(len(json.dumps(m, ensure_ascii=False).encode()) for m, _ in alive.values())
    assert store.bytes == text + sum(len(i.encode()) for i in media)  # each image once, however often named
    if kept:  # the newest that was kept is always there
        assert max(kept, key=int) in alive


def test_a_flood_of_image_responses_stays_under_the_cap(loaded_model) -> None:
    """Distinct ~50 KB images in every request, stored: the store keeps the newest and stays under its cap;
    one image named by many stored turns is kept once."""
    import numpy as np
    from PIL import Image

    from .conftest import make_server

    def noise(seed: int, side: int = 128) -> str:
        pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    cap = 400_000
    servers = make_server(loaded_model, response_store_bytes=cap)
    server = next(servers)
    try:
        client = openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)
        store: ResponseStore = server.app.state.responses
        ids = []
        for seed in range(24):
            content = [{"type": "input_image", "image_url": noise(seed)}, {"type": "input_text", "text": "?"}]
            reply = client.responses.create(
                model=server.model_id, input=[{"role": "user", "content": content}], max_output_tokens=1
            )
            ids.append(reply.id)
            assert store.bytes <= cap and reply.store
        assert store.get(ids[-1]) is not None and store.get(ids[0]) is None  # 24 x ~66 KB: the oldest went
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=server.model_id, input="x", previous_response_id=ids[0], max_output_tokens=1)
        follow = client.responses.create(
            model=server.model_id, input="and?", previous_response_id=ids[-1], max_output_tokens=1
        )
        assert follow.previous_response_id == ids[-1]
        # The same image in ten chained turns: stored once.
        image = noise(99)
        first = client.responses.create(
            model=server.model_id,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": image}]}],
            max_output_tokens=1,
        )
        after_first, previous = store.bytes, first.id
        for _ in range(9):
            previous = client.responses.create(
                model=server.model_id, input="more", previous_response_id=previous, max_output_tokens=1
            ).id
        assert store.bytes - after_first < len(image)  # nine more turns cost their text, not the image again
        big = noise(7, side=400)  # about 640 KB as a data URL, a few hundred tokens
        assert len(big) > cap
        content = [{"type": "input_image", "image_url": big}]
        huge = client.responses.create(
            model=server.model_id, input=[{"role": "user", "content": content}], max_output_tokens=1
        )
        assert huge.store is False and store.get(huge.id) is None  # served, but too large to keep
    finally:
        next(servers, None)
