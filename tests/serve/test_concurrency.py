"""Under load: 32 concurrent streaming clients get exactly their single-request outputs, and a client that
leaves mid-stream frees its slot without disturbing the others."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import openai
import pytest

from .conftest import IMAGES, make_server

CLIENTS = 32
TOKENS = 12


IMAGES_FOR = {3: "rgb_56x56.png", 10: "rgb_112x168.png", 17: "gray_120x80.png", 24: "rgb_56x56.png"}
"""Some clients send an image: they are prefilled alone (vision tower, their own rotary offsets), then decode
in the shared batch."""


def prompts() -> list:
    out: list = []
    for i in range(CLIENTS):
        text = f"Client {i} asks: {'why ' * (i % 5)}?"
        if i in IMAGES_FOR:
            image = base64.b64encode((IMAGES / IMAGES_FOR[i]).read_bytes()).decode()
            out.append(
                [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": text},
                ]
            )
        else:
            out.append(text)
    return out


async def stream_one(client: openai.AsyncOpenAI, model: str, prompt, max_tokens: int = TOKENS) -> str:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_concurrent_streams_equal_single_requests(server) -> None:
    sync = openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)
    alone = [
        sync.chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": p}], max_tokens=TOKENS
        )
        .choices[0]
        .message.content
        for p in prompts()
    ]

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base, api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(stream_one(client, server.model_id, p) for p in prompts()))

    cache = server.app.state.engine.loaded.vision_cache  # /metrics shows it only once a minute
    hits_before = cache.hits
    together = asyncio.run(main())
    assert together == alone
    # The images were seen in the single-request pass: their vision features come from the cache now.
    assert cache.hits >= hits_before + len(IMAGES_FOR)
    assert len(set(alone)) > CLIENTS // 2  # distinct prompts, distinct answers: no cross-talk to hide behind


def test_disconnect_mid_stream(server) -> None:
    before = httpx.get(f"{server.url}/metrics").json()["engine"]["cancelled"]
    survivors = prompts()[:4]  # one of them with an image
    sync = openai.OpenAI(base_url=server.base, api_key="x", max_retries=0)
    alone = [
        sync.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": p}], max_tokens=40)
        .choices[0]
        .message.content
        for p in survivors
    ]

    async def leaver() -> int:
        body = {
            "model": server.model_id,
            "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 1000,
            "stream": True,
        }
        got = 0
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", f"{server.base}/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    got += line.startswith("data: ")
                    if got == 3:
                        break  # leave: the connection closes with the block
        return got

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=server.base, api_key="x", max_retries=0) as client:
            return await asyncio.gather(leaver(), *(stream_one(client, server.model_id, p, 40) for p in survivors))

    got, *texts = asyncio.run(main())
    assert got == 3 and texts == alone
    deadline = time.monotonic() + 10
    while True:
        engine = httpx.get(f"{server.url}/metrics").json()["engine"]
        if engine["cancelled"] > before and engine["running"] == 0:
            break
        assert time.monotonic() < deadline, (before, engine)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def roomy_server(loaded_model):
    """Room for an answer long enough that the tiny model cannot finish it before its client gives up."""
    yield from make_server(loaded_model, context_length=LONG + 64, max_tokens_limit=LONG)


LONG = 30_000


def test_disconnect_while_waiting_for_a_whole_answer(roomy_server) -> None:
    """A non-streaming client that gives up is noticed too, and its request stops."""
    server = roomy_server
    before = httpx.get(f"{server.url}/metrics").json()["engine"]
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": LONG,
        "ignore_eos": True,
    }
    try:
        httpx.post(f"{server.base}/chat/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError(f"{LONG} tokens came back within half a second; the test needs a longer request")
    deadline = time.monotonic() + 10
    while True:
        engine = httpx.get(f"{server.url}/metrics").json()["engine"]
        if engine["cancelled"] > before["cancelled"] and engine["running"] == 0:
            break
        assert time.monotonic() < deadline, (before, engine)
        time.sleep(0.05)
    assert engine["generation_tokens"] - before["generation_tokens"] < LONG
