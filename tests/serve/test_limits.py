"""Bounded cost per request against a live server: a far-too-long prompt is refused early, in little time and
memory; a client that leaves while its prompt is prepared stops that work."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import CONTEXT

PROC = Path("/proc/self")
MB = 1024 * 1024


@pytest.fixture(scope="module")
def roomy(loaded_model):
    """A server with the default 64 MB body limit (the session's server has 2 MB)."""
    from .conftest import make_server

    yield from make_server(loaded_model)


def memory_kib(field: str) -> int:
    for line in (PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def peak_rise_mb(send) -> tuple[httpx.Response, float]:
    """``send()``'s answer and how far this process's peak memory (server and client together) rose above
    what it held before; Linux only."""
    try:
        (PROC / "clear_refs").write_text("5")  # resets the peak to the current size
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    before = memory_kib("VmRSS")
    response = send()
    return response, (memory_kib("VmHWM") - before) / 1024


def post(server, body: bytes, path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(f"{server.base}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


def test_a_16m_character_prompt_is_refused_quickly_in_little_memory(roomy) -> None:
    server = roomy
    text = "word " * (16_000_000 // 5)
    body = json.dumps({"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
    del text
    started = time.monotonic()
    response, rise = peak_rise_mb(lambda: post(server, body.encode()))
    elapsed = time.monotonic() - started
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert f"more than {CONTEXT} tokens" in response.json()["error"]["message"]
    # Before: the whole text was tokenized (16 M characters: 37-85 s, +2.5-3 GB). The bounds are loose for slow
    # CI machines; benchmarks/bench_hardening.py measures.
    assert elapsed < 30 and rise < 600, (elapsed, rise)


class TenCharsPerToken:
    """A tokenizer stand-in: one token per ten characters, and a log of how much text it was given."""

    def __init__(self) -> None:
        self.seen = 0

    def encode(self, text: str) -> list[int]:
        self.seen += len(text)
        return [0] * -(-len(text) // 10)


@settings(max_examples=60, deadline=None)
@given(st.integers(16, 4000), st.floats(0.1, 40.0))
def test_counting_refuses_exactly_what_is_past_the_context_and_stops_early(context, ratio) -> None:
    import threading

    from vlm_serve.errors import APIError
    from vlm_serve.prompts import COUNT_CHUNK_CHARS, _refuse_beyond_context

    prompt = "x" * int(context * 10 * ratio)  # ratio x the context, in this tokenizer's tokens
    counter = TenCharsPerToken()
    try:
        _refuse_beyond_context(counter, prompt, context, threading.Event())
        refused = False
    except APIError as e:
        refused = e.code == "context_length_exceeded"
    tokens = -(-len(prompt) // 10)
    if tokens <= context:
        assert not refused  # never a prompt that fits
    if refused:  # and it looked at about `context` tokens' worth of text, not at the whole prompt
        assert counter.seen <= 10 * context + 2 * COUNT_CHUNK_CHARS + 10 * 8 * (counter.seen // COUNT_CHUNK_CHARS + 1)
    if ratio > 2 and len(prompt) > 4 * context:
        assert refused  # far past the context: refused before the real tokenization


def test_a_client_that_leaves_stops_the_preparation(roomy, monkeypatch) -> None:
    """The prompt is counted on a worker thread; when the client disconnects, that thread stops at its next
    chunk instead of tokenizing the rest for nobody."""
    import vlm_serve.prompts as prompts

    server = roomy
    chunks: list[float] = []
    real_encode = server.app.state.engine.loaded.processor.encode

    def slow_encode(text: str) -> list[int]:
        chunks.append(time.monotonic())
        time.sleep(0.2)
        return real_encode(text)[:1]  # one token per chunk: the count never gets past the context

    monkeypatch.setattr(server.app.state.engine.loaded.processor, "encode", slow_encode)
    text = "word " * (200 * prompts.COUNT_CHUNK_CHARS // 5)  # 200 chunks: 40 s of counting if nobody stops it
    body = json.dumps({"model": server.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": text}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(request)
        deadline = time.monotonic() + 20
        while len(chunks) < 3:
            assert time.monotonic() < deadline, "counting never started"
            time.sleep(0.05)
    left = time.monotonic()
    time.sleep(3)
    after = [t for t in chunks if t > left + 1.0]  # a poll interval and a chunk in flight, then nothing
    assert len(chunks) < 50 and not after, (len(chunks), after)
