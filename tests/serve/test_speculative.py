"""``vlm serve --draft-model``: every request decodes speculatively inside the batching engine and answers what
the plain server answers (greedy: the same tokens, logprobs of the target, stop strings, images, a grammar,
concurrent clients); usage and /metrics report the drafted and accepted tokens; the flags reach the settings
and a drafter of another tokenizer stops the server with one line."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from vlm_models.cli import build_parser
from vlm_models.drafting import load_drafter

from .conftest import IMAGES, MODEL, ROOT, Server, make_server

SIBLING = ROOT / "tests" / "fixtures" / "qwen2_5_vl" / "hf4"  # another family, the same tokenizer
EAGLE3 = ROOT / "tests" / "fixtures" / "eagle3" / "qwen2_vl_midlayer"  # a random EAGLE-3 head for the target
DFLASH = ROOT / "tests" / "fixtures" / "dflash" / "qwen2_vl"  # a random DFlash drafter for the target
OTHER_TOKENIZER = ROOT / "tests" / "fixtures" / "llava" / "hf4"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=[MODEL, SIBLING, EAGLE3, DFLASH], ids=["itself", "sibling", "eagle3", "dflash"])
def servers(request, loaded_model) -> Iterator[tuple[Server, Server]]:
    """A plain server and one drafting, side by side: with the target itself (proposals kept but where the
    grammar or a stop string decides), with a sibling model, an EAGLE-3 head or a DFlash drafter of random
    weights (mostly rejected)."""
    drafter, kind = load_drafter(request.param, target_processor=loaded_model[1], target=loaded_model[0])
    options = dict(allow_local_media=IMAGES, num_draft_tokens=4)
    for plain in make_server(loaded_model, **options):
        for fast in make_server(loaded_model, drafter=drafter, draft_kind=kind, **options):
            yield plain, fast


def chat(server: Server, content: Any, **extra: Any) -> dict[str, Any]:
    body = {"model": server.model_id, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
    body.setdefault("max_tokens", 64)
    response = httpx.post(f"{server.base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


IMAGE_QUESTION = [
    {"type": "image_url", "image_url": {"url": str(IMAGES / "rgb_112x168.png")}},
    {"type": "text", "text": "What is in this picture?"},
]


@pytest.mark.parametrize(
    "content, extra",
    [
        ("Tell me a story about a lighthouse.", {}),
        (IMAGE_QUESTION, {"logprobs": True, "top_logprobs": 2}),
        ("Count to twenty.", {"stop": ["e"]}),
    ],
    ids=["text", "image-logprobs", "stop"],
)
def test_answers_equal_the_plain_servers(servers, content, extra) -> None:
    plain, fast = servers
    a, b = chat(plain, content, **extra), chat(fast, content, **extra)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    if "logprobs" in extra:
        ours = [t["logprob"] for t in b["choices"][0]["logprobs"]["content"]]
        theirs = [t["logprob"] for t in a["choices"][0]["logprobs"]["content"]]
        assert ours == pytest.approx(theirs, abs=1e-4)
    details = b["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] > 0
    assert "completion_tokens_details" not in a["usage"]


def test_a_grammar_masks_the_drafts_and_the_verified_tokens(servers, request) -> None:
    plain, fast = servers
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    a = chat(plain, "Who is Ada?", response_format=fmt, max_tokens=80)
    b = chat(fast, "Who is Ada?", response_format=fmt, max_tokens=80)
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    json.loads(b["choices"][0]["message"]["content"])  # the schema held while drafting
    if request.node.callspec.id == "itself":
        # The grammar masked the target's own model while it drafted: what it proposes, the target keeps.
        details = b["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 10 and details["rejected_prediction_tokens"] <= 2


def test_streamed_and_concurrent_clients_get_the_plain_answers(servers) -> None:
    plain, fast = servers
    questions = [f"Question {i}: name {'a few ' * i}colours." for i in range(6)]
    expected = [chat(plain, q, max_tokens=40)["choices"][0]["message"]["content"] for q in questions]
    answers: list[str | None] = [None] * len(questions)

    def ask(i: int) -> None:
        answers[i] = chat(fast, questions[i], max_tokens=40)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == expected

    async def streamed() -> str:
        body = {
            "model": fast.model_id,
            "messages": [{"role": "user", "content": questions[2]}],
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        }
        parts = []
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{fast.base}/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return "".join(parts)

    assert asyncio.run(streamed()) == expected[2]


def test_a_prompt_read_from_the_prefix_cache_drafts_and_answers_the_same(servers) -> None:
    plain, fast = servers
    question = "A question asked twice, long enough that its prompt fills a few prefix-cache blocks of tokens."
    first, second = chat(fast, question, max_tokens=32), chat(fast, question, max_tokens=32)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    expected = chat(plain, question, max_tokens=32)["choices"][0]["message"]
    assert first["choices"][0]["message"] == second["choices"][0]["message"] == expected
    details = second["usage"]["completion_tokens_details"]  # it drafted, over the cached blocks
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] > 0


def test_metrics_report_drafted_and_accepted_tokens(servers) -> None:
    plain, fast = servers
    chat(fast, "Once more, please.", max_tokens=32)
    metrics = httpx.get(f"{fast.url}/metrics").json()["speculative"]
    assert (
        metrics["kind"] in ("draft", "eagle3", "dflash") and metrics["draft_tokens"] >= metrics["accepted_draft_tokens"]
    )
    assert metrics["draft_tokens"] > 0
    assert metrics["acceptance_rate"] == metrics["accepted_draft_tokens"] / metrics["draft_tokens"]
    assert "speculative" not in httpx.get(f"{plain.url}/metrics").json()


def test_the_flags_reach_the_settings_and_a_foreign_tokenizer_is_refused() -> None:
    from vlm_serve import ModelHost
    from vlm_serve.cli import settings_from

    args = ["serve", "--model", str(MODEL), "--draft-model", str(SIBLING), "--num-draft-tokens", "6"]
    settings = settings_from(build_parser().parse_args([*args, "--draft-kind", "draft"]))
    assert (settings.draft_model, settings.draft_kind, settings.num_draft_tokens) == (str(SIBLING), "draft", 6)
    with pytest.raises(ValueError, match="num-draft-tokens must be >= 1"):
        settings_from(build_parser().parse_args([*args[:-1], "0"]))
    host = ModelHost(
        settings_from(build_parser().parse_args(["serve", "--model", str(MODEL), "--draft-model", str(EAGLE3)]))
    )
    asyncio.run(host.preload())
    assert host.loaded is not None and host.loaded.engine.drafting and host.loaded.draft_kind == "eagle3"
    host.close()
    foreign = settings_from(
        build_parser().parse_args(["serve", "--model", str(MODEL), "--draft-model", str(OTHER_TOKENIZER)])
    )
    with pytest.raises(ValueError, match=r"--draft-model: .*another tokenizer"):
        asyncio.run(ModelHost(foreign).preload())
