"""The OpenAI SDK against a real server: chat with an image, streaming with usage, logprobs, sampling options."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from vlm_models import apply_chat_template
from vlm_runtime import generate

from .conftest import IMAGES

PNG = IMAGES / "rgb_56x56.png"


def data_url(path=PNG) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)


def reference(loaded_model, messages, *, image=None, **options) -> str:
    model, processor = loaded_model
    prompt = apply_chat_template(processor, None, messages)
    return generate(model, processor, prompt, image=image, **options).text


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == [server.model_id]
    assert httpx.get(f"{server.url}/models").json()["data"][0]["id"] == server.model_id
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "model": server.model_id, "loaded": True}


def test_chat_with_an_image_matches_generate(server, client, loaded_model) -> None:
    response = client.chat.completions.create(
        model=server.model_id,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url()}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
        ],
        max_tokens=12,
    )
    expected_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    assert response.choices[0].message.content == reference(
        loaded_model, expected_messages, image=str(PNG), max_tokens=12
    )
    usage = response.usage
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    processor = loaded_model[1]
    prompt = apply_chat_template(processor, None, expected_messages)
    assert usage.prompt_tokens == processor(prompt, [str(PNG)])["input_ids"].shape[1]  # image tokens included
    assert response.choices[0].finish_reason == "length"


def test_local_image_path_under_the_allowed_folder(server, client, loaded_model) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": str(IMAGES / "rgb_112x168.png")}},
        {"type": "text", "text": "x"},
    ]
    response = client.chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": content}], max_tokens=6
    )
    expected = reference(
        loaded_model,
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        image=str(IMAGES / "rgb_112x168.png"),
        max_tokens=6,
    )
    assert response.choices[0].message.content == expected


def test_streaming_chunks_and_usage(server, client, loaded_model) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    chunks = list(
        client.chat.completions.create(
            model=server.model_id, messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(loaded_model, messages, max_tokens=10)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_ends_with_done(server) -> None:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base}/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_logprobs(server, client, loaded_model) -> None:
    messages = [{"role": "user", "content": "logprobs please"}]
    response = client.chat.completions.create(
        model=server.model_id, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    model, processor = loaded_model
    prompt = apply_chat_template(processor, None, messages)
    expected = generate(model, processor, prompt, max_tokens=6, logprobs=True, top_logprobs=3)
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the most likely
        assert entry.bytes == list(entry.token.encode())
    assert content[-1].logprob == pytest.approx(expected.logprob, abs=1e-5)
    streamed = [
        c.choices[0].logprobs.content[0]
        for c in client.chat.completions.create(
            model=server.model_id, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
        )
        if c.choices and c.choices[0].logprobs
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_seeded_sampling_repeats_and_stop_strings(server, client, loaded_model) -> None:
    messages = [{"role": "user", "content": "random"}]
    runs = [
        client.chat.completions.create(
            model=server.model_id, messages=messages, max_tokens=12, temperature=1.0, seed=3, top_p=0.9
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1] == reference(loaded_model, messages, max_tokens=12, temperature=1.0, seed=3, top_p=0.9)
    full = reference(loaded_model, messages, max_tokens=12)
    stop = full[3:5]
    response = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=12, stop=[stop])
    assert response.choices[0].message.content == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
