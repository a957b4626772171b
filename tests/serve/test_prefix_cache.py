"""The server's prefix cache: on by default, reported in usage, GET /v1/cache/stats and /metrics, cleared by
POST /v1/cache/reset, namespaced by X-Prefix-Cache-Tenant, off with --no-prefix-cache; many concurrent clients
get what they get alone; two server processes in sequence share the disk tier."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from vlm_models import apply_chat_template
from vlm_models.cli import build_parser
from vlm_runtime import generate

from .conftest import MODEL, ROOT, Server, make_server

SYSTEM = "You are a meticulous assistant for a hardware store. Always answer briefly and politely. " * 3


@pytest.fixture(scope="module")
def cached_server(loaded_model) -> Iterator[Server]:
    yield from make_server(loaded_model)


def chat(server: Server, question: str, system: str = SYSTEM, tenant: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    headers = {"X-Prefix-Cache-Tenant": tenant} if tenant is not None else {}
    body = {"model": server.model_id, "messages": messages, "max_tokens": 5, "temperature": 0}
    response = httpx.post(f"{server.base}/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def alone(loaded_model, question: str, system: str = SYSTEM) -> str:
    model, processor = loaded_model
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return generate(model, processor, apply_chat_template(processor, None, messages), max_tokens=5).text


def stats(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.base}/cache/stats").json()


def cached(answer: dict[str, Any]) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_on_by_default_with_hits_in_usage_and_stats(cached_server, loaded_model):
    httpx.post(f"{cached_server.base}/cache/reset", json={})
    before = stats(cached_server)
    assert before["enabled"] and before["block_size"] == 16 and before["memory_blocks"] == 0
    first = chat(cached_server, "Do you sell hammers?")
    second = chat(cached_server, "Do you sell hammers?")
    expected = alone(loaded_model, "Do you sell hammers?")
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"] == expected
    assert cached(first) == 0 and cached(second) > 0
    after = stats(cached_server)
    assert after["hits"] - before["hits"] == 1 and after["misses"] - before["misses"] == 1
    assert after["matched_tokens"] - before["matched_tokens"] == cached(second)
    assert after["memory_bytes"] > 0 and after["disk_bytes"] == 0
    metrics = httpx.get(f"{cached_server.url}/metrics").json()
    assert set(metrics["prefix_cache"]) >= {"hits", "misses", "matched_tokens", "evictions", "window_s"}


def test_another_tenant_never_hits(cached_server):
    question = "Is the store open on Sunday?"
    httpx.post(f"{cached_server.base}/cache/reset", json={})  # the shared namespace holds the system prompt
    chat(cached_server, question, tenant="shop-a")
    assert cached(chat(cached_server, question, tenant="shop-b")) == 0
    assert cached(chat(cached_server, question)) == 0
    assert cached(chat(cached_server, question, tenant="shop-a")) > 0


def test_an_overlong_tenant_is_refused(cached_server):
    response = httpx.post(
        f"{cached_server.base}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers={"X-Prefix-Cache-Tenant": "t" * 300},
    )
    assert response.status_code == 400 and "X-Prefix-Cache-Tenant".lower() in response.text.lower()


def test_reset_empties_the_cache(cached_server):
    chat(cached_server, "What about nails?")
    reset = httpx.post(f"{cached_server.base}/cache/reset", json={}).json()
    assert reset["enabled"] and reset["dropped_blocks"] > 0
    assert stats(cached_server)["memory_blocks"] == 0
    assert cached(chat(cached_server, "What about nails?")) == 0


def test_no_prefix_cache_turns_it_off(loaded_model):
    for server in make_server(loaded_model, prefix_cache=None):
        assert stats(server) == {"enabled": False, "model": server.model_id}
        chat(server, "Screws?")
        assert cached(chat(server, "Screws?")) == 0
        assert httpx.post(f"{server.base}/cache/reset", json={}).json() == {"enabled": False}


def test_the_flags_reach_the_settings(tmp_path):
    from vlm_serve.cli import settings_from

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert settings_from(args).prefix_cache is not None
    assert settings_from(build_parser().parse_args(["serve", "--model", "m", "--no-prefix-cache"])).prefix_cache is None
    flags = ["--prefix-cache-blocks", "64", "--prefix-cache-disk", str(tmp_path), "--prefix-cache-disk-max-gb", "0.5"]
    chosen = settings_from(build_parser().parse_args(["serve", "--model", "m", *flags])).prefix_cache
    assert (chosen.max_blocks, chosen.disk_dir, chosen.disk_max_bytes) == (64, tmp_path, 2**29)
    with pytest.raises(ValueError, match="disk-max-gb"):
        settings_from(build_parser().parse_args(["serve", "--model", "m", "--prefix-cache-disk-max-gb", "0"]))
    assert settings_from(args).prefix_cache.max_bytes == 2 * 2**30  # the default memory cap
    sized = settings_from(build_parser().parse_args(["serve", "--model", "m", "--prefix-cache-memory-gb", "0.25"]))
    assert sized.prefix_cache.max_bytes == 2**28
    with pytest.raises(ValueError, match="memory-gb"):
        settings_from(build_parser().parse_args(["serve", "--model", "m", "--prefix-cache-memory-gb", "-1"]))


def test_32_clients_with_shared_and_private_prefixes_get_their_outputs_alone(cached_server, loaded_model):
    cases = [(SYSTEM if i % 4 else f"Private notes of client {i}. " * 6, f"Question {i % 5}?") for i in range(32)]
    tenants = [None if i % 3 else f"tenant-{i % 2}" for i in range(32)]
    expected = {case: alone(loaded_model, case[1], case[0]) for case in set(cases)}
    answers: dict[int, dict[str, Any]] = {}

    def client(i: int) -> None:
        answers[i] = chat(cached_server, cases[i][1], cases[i][0], tenants[i])

    for _ in range(2):  # the second round finds the first round's blocks
        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [answers[i]["choices"][0]["message"]["content"] for i in range(32)] == [expected[c] for c in cases]
    assert all(cached(answers[i]) > 0 for i in range(32))


DISK_RUN = """
import json, sys
from fastapi.testclient import TestClient
from vlm_models import load
from vlm_runtime.prefix_cache import PrefixCacheSettings
from vlm_serve import ModelHost, ServeSettings, create_app

model_path, disk = sys.argv[1], sys.argv[2]
settings = ServeSettings(
    model=model_path,
    context_length=1024,
    allowed_hosts=("testserver",),
    prefix_cache=PrefixCacheSettings(disk_dir=disk),
)
model, processor = load(model_path)
host = ModelHost.from_model(model_path, model, processor, settings, context_length=1024)
with TestClient(create_app(host, settings)) as client:
    messages = [{"role": "system", "content": sys.argv[3]}, {"role": "user", "content": "Hello?"}]
    answer = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).json()
    stats = client.get("/v1/cache/stats").json()
print(json.dumps({"text": answer["choices"][0]["message"]["content"], "usage": answer["usage"], "stats": stats}))
"""


@pytest.mark.slow
def test_two_server_processes_in_sequence_share_the_disk_tier(tmp_path):
    def serve_once() -> dict[str, Any]:
        command = [sys.executable, "-c", DISK_RUN, str(MODEL), str(tmp_path), SYSTEM]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = serve_once(), serve_once()
    assert first["text"] == second["text"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert list(tmp_path.glob("*.safetensors"))  # the first process wrote its shards before it exited
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["stats"]["disk_hits"] > 0 and second["stats"]["memory_blocks"] > 0
