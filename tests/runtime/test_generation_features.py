"""Generation-loop features on the toy model: thinking budgets, stop strings, logprobs, penalties, the prompt
cache and batched generation. Each is checked against a recomputation by full forward passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import (
    BatchGenerator,
    GenerationConfig,
    PromptCache,
    Request,
    SamplingParams,
    batch_generate,
    generate,
    stream_generate,
)
from vlm_runtime.sampling import make_logits_processors
from vlm_runtime.thinking import ThinkingBudget, ThinkingTokens

from .toy import END_THINK, THINK, ByteProcessor, ToyModel

ROOT = Path(__file__).resolve().parents[2]
NEWLINE = ord("\n")


@pytest.fixture(scope="module")
def model() -> ToyModel:
    return ToyModel()


def full_logits(model: ToyModel, ids: list[int]) -> mx.array:
    return model(mx.array([ids]))[0, -1]


def greedy_continuation(model: ToyModel, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(mx.argmax(full_logits(model, ids + out)).item()))
    return out


def tokens_of(results) -> list[int]:
    return [r.token for r in results]


# ---------------------------------------------------------------------------------------------- thinking


def test_thinking_budget_closes_the_block_and_the_answer_continues(model: ToyModel) -> None:
    processor = ByteProcessor()
    prompt = "question<think>"
    results = list(stream_generate(model, processor, prompt, max_tokens=12, thinking_budget=3, ignore_eos=True))
    tokens = tokens_of(results)
    prompt_ids = processor.prepare_inputs(prompt)["input_ids"][0].tolist()
    # Three thinking tokens of the model's own choice, then the runtime's "\n</think>".
    assert tokens[:3] == greedy_continuation(model, prompt_ids, 3)
    assert tokens[3:5] == [NEWLINE, END_THINK]
    # The answer continues from the forced tokens: the cache holds exactly what was emitted.
    assert tokens[5:] == greedy_continuation(model, prompt_ids + tokens[:5], 7)
    reasoning = "".join(r.reasoning for r in results)
    answer = "".join(r.text for r in results)
    assert reasoning == processor.decode(tokens[:4])
    assert answer == processor.decode(tokens[5:]).lstrip()


def test_zero_budget_closes_at_once(model: ToyModel) -> None:
    tokens = tokens_of(
        stream_generate(model, ByteProcessor(), "q<think>", max_tokens=4, thinking_budget=0, ignore_eos=True)
    )
    assert tokens[:2] == [NEWLINE, END_THINK]


def test_budget_waits_for_the_model_to_open_the_block(model: ToyModel) -> None:
    """Without an open block in the prompt, the budget changes nothing until the model writes <think>."""
    plain = generate(model, ByteProcessor(), "hello", max_tokens=10, ignore_eos=True)
    budgeted = generate(model, ByteProcessor(), "hello", max_tokens=10, thinking_budget=1, ignore_eos=True)
    assert plain.text == budgeted.text and budgeted.reasoning == ""


def test_reasoning_is_separated_without_a_budget(model: ToyModel) -> None:
    """A block the model closes itself (forced here by a logit bias on </think>)."""
    result = generate(model, ByteProcessor(), "x<think>", max_tokens=3, logit_bias={END_THINK: 50.0}, ignore_eos=True)
    assert result.reasoning == "" and result.token == END_THINK


TOKENS = ThinkingTokens(start=THINK, end=END_THINK, closing=(NEWLINE, END_THINK))


@settings(max_examples=60, deadline=None)
@given(
    proposals=st.lists(st.sampled_from([THINK, END_THINK, NEWLINE, 65, 66, 67]), min_size=1, max_size=60),
    budget=st.integers(0, 6),
    inside=st.booleans(),
)
def test_budget_bounds_every_thinking_block(proposals: list[int], budget: int, inside: bool) -> None:
    """Whatever the model proposes, no block holds more than ``budget`` tokens before its closing sequence."""
    controller = ThinkingBudget(TOKENS, budget, inside=inside)
    emitted: list[int] = []
    forced = controller(None)
    for proposal in proposals:
        token = proposal if forced is None else forced
        emitted.append(token)
        forced = controller(token)
    in_block, used = inside, 0
    i = 0
    while i < len(emitted):
        token = emitted[i]
        if token == END_THINK:
            in_block = False
        elif token == THINK and not in_block:
            in_block, used = True, 0
        elif in_block:
            if used == budget:
                # The budget is spent: the next tokens are exactly the closing sequence (as far as emitted).
                assert emitted[i : i + 2] == [NEWLINE, END_THINK][: len(emitted) - i]
                in_block = False
                i += 2
                continue
            used += 1
        i += 1


# ---------------------------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens_is_never_emitted(model: ToyModel) -> None:
    full = generate(model, ByteProcessor(), "stop me", max_tokens=20, ignore_eos=True).text
    stop = full[5:8]
    assert len(stop.encode()) > 1  # spans several byte tokens
    result = generate(model, ByteProcessor(), "stop me", max_tokens=20, stop=[stop], ignore_eos=True)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text


# ---------------------------------------------------------------------------------------------- logprobs


def test_logprobs_match_the_full_forward(model: ToyModel) -> None:
    processor = ByteProcessor()
    prompt_ids = processor.prepare_inputs("lp")["input_ids"][0].tolist()
    results = list(
        stream_generate(model, processor, "lp", max_tokens=5, logprobs=True, top_logprobs=3, ignore_eos=True)
    )
    seen: list[int] = []
    for r in results:
        logits = full_logits(model, prompt_ids + seen)
        reference = np.array(logits - mx.logsumexp(logits))
        assert r.logprob == pytest.approx(float(reference[r.token]), abs=1e-4)
        assert [t for t, _ in r.top_logprobs] == list(np.argsort(-reference)[:3])
        assert [v for _, v in r.top_logprobs] == pytest.approx(sorted(reference, reverse=True)[:3], abs=1e-4)
        assert r.top_logprobs[0][0] == r.token  # greedy picks the most likely
        seen.append(r.token)


def test_no_logprobs_unless_asked(model: ToyModel) -> None:
    result = generate(model, ByteProcessor(), "lp", max_tokens=3, ignore_eos=True)
    assert result.logprob is None and result.top_logprobs == ()


@pytest.mark.parametrize("top", [-1, 21])
def test_top_logprobs_range(model: ToyModel, top: int) -> None:
    with pytest.raises(ValueError):
        GenerationConfig(top_logprobs=top)


# ---------------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.8, "repetition_context_size": 6},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.0},
        {"logit_bias": {ord("a"): 3.0, ord("e"): -5.0}},
    ],
)
def test_penalties_follow_the_reference_loop(model: ToyModel, options: dict) -> None:
    processor = ByteProcessor()
    prompt_ids = processor.prepare_inputs("aaaa")["input_ids"][0].tolist()
    got = tokens_of(stream_generate(model, processor, "aaaa", max_tokens=10, ignore_eos=True, **options))
    processors = make_logits_processors(SamplingParams(**options))
    expected: list[int] = []
    for step in range(10):
        logits = full_logits(model, prompt_ids + expected)[None]
        history = mx.array([prompt_ids + expected], mx.int32)
        for process in processors:
            logits = process(logits, history, step)
        expected.append(int(mx.argmax(logits[0]).item()))
    assert got == expected
    assert got != tokens_of(stream_generate(model, processor, "aaaa", max_tokens=10, ignore_eos=True))


# ---------------------------------------------------------------------------------------------- prompt cache


def test_prompt_cache_reuses_a_prefix_and_changes_nothing(model: ToyModel) -> None:
    processor = ByteProcessor()
    cache = PromptCache()
    system = "You are a terse assistant. " * 3
    first = generate(model, processor, system + "Q1", max_tokens=6, prompt_cache=cache, ignore_eos=True)
    assert first.cached_tokens == 0
    second = generate(model, processor, system + "Q2?", max_tokens=8, prompt_cache=cache, ignore_eos=True)
    fresh = generate(model, processor, system + "Q2?", max_tokens=8, ignore_eos=True)
    assert second.cached_tokens == len(processor.encode(system + "Q")) + 1  # BOS + the shared text
    assert second.text == fresh.text
    # A follow-up that extends the whole conversation reuses everything fed so far.
    follow = system + "Q2?" + second.text + "more"
    third = generate(model, processor, follow, max_tokens=4, prompt_cache=cache, ignore_eos=True)
    assert third.cached_tokens >= len(processor.encode(system + "Q2?")) + 1
    assert third.text == generate(model, processor, follow, max_tokens=4, ignore_eos=True).text


def test_prompt_cache_file_continues_identically_in_another_process(model: ToyModel, tmp_path: Path) -> None:
    processor = ByteProcessor()
    system = "A long system prompt that is worth caching. " * 4
    cache = PromptCache()
    generate(model, processor, system, max_tokens=1, prompt_cache=cache)
    path = tmp_path / "system.safetensors"
    cache.save(path, {"note": "system prompt"})
    expected = generate(model, processor, system + "User: hi", max_tokens=10, ignore_eos=True)
    code = (
        "from tests.runtime.toy import ByteProcessor, ToyModel; from vlm_runtime import PromptCache, generate; "
        f"cache, meta = PromptCache.load({str(path)!r}); assert meta == {{'note': 'system prompt'}}, meta; "
        f"r = generate(ToyModel(), ByteProcessor(), {system + 'User: hi'!r}, max_tokens=10, ignore_eos=True, "
        "prompt_cache=cache); print(r.cached_tokens); print(repr(r.text))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cached, text = out.stdout.strip().splitlines()
    assert int(cached) == len(processor.encode(system)) + 1
    assert text == repr(expected.text)


def test_prompt_cache_with_other_settings_starts_over(model: ToyModel) -> None:
    cache = PromptCache()
    generate(model, ByteProcessor(), "same prefix here", max_tokens=2, prompt_cache=cache)
    again = generate(
        model, ByteProcessor(), "same prefix here!", max_tokens=2, prompt_cache=cache, kv_bits=8, kv_group_size=32
    )
    assert again.cached_tokens == 0


# ---------------------------------------------------------------------------------------------- batching


PROMPTS = ["a", "a much longer prompt than the others", "mid length", "zz"]


def test_batch_generate_equals_single_generate(model: ToyModel) -> None:
    processor = ByteProcessor()
    results = batch_generate(model, processor, PROMPTS, max_tokens=12, ignore_eos=True)
    for prompt, result in zip(PROMPTS, results):
        single = generate(model, processor, prompt, max_tokens=12, ignore_eos=True)
        assert result.text == single.text
        assert result.generation_tokens == 12 and result.finish_reason == "length"


@given(lengths=st.lists(st.integers(0, 6), min_size=2, max_size=5), budget=st.sampled_from([8, 40, 2048]))
@settings(max_examples=15, deadline=None)
def test_requests_admitted_together_equal_each_alone(model: ToyModel, lengths: list[int], budget: int) -> None:
    """Requests arriving in one step are prefilled as left-padded groups (as many as fit the prefill budget);
    rows that finish on their first token (max_tokens 1, or 0) leave the group's cache at once."""
    processor = ByteProcessor()
    engine = BatchGenerator(model, processor, max_batch_size=8, prefill_step_size=budget)
    configs = [GenerationConfig(max_tokens=n, ignore_eos=True) for n in lengths]
    uids = [engine.submit(Request(processor.prepare_inputs(PROMPTS[i % 4]), config=c)) for i, c in enumerate(configs)]
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                tokens[event.uid].append(event.token)
    for i, (uid, config) in enumerate(zip(uids, configs)):
        alone = BatchGenerator(model, processor, max_batch_size=1)
        only = alone.submit(Request(processor.prepare_inputs(PROMPTS[i % 4]), config=config))
        expected = [e.token for e in _drain(alone) if e.uid == only and e.token is not None]
        assert tokens[uid] == expected and len(expected) == config.max_tokens


def _drain(engine: BatchGenerator) -> list:
    events = []
    while engine.has_work():
        events.extend(engine.step())
    return events


def test_requests_join_and_leave_between_steps(model: ToyModel) -> None:
    processor = ByteProcessor()
    engine = BatchGenerator(model, processor, max_batch_size=4)
    config = GenerationConfig(max_tokens=10, ignore_eos=True)
    uids = {engine.submit(Request(processor.prepare_inputs(p), config=config)): p for p in PROMPTS[:2]}
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    finishes: dict[int, str] = {}
    steps = 0
    while engine.has_work():
        if steps == 3:  # a request arrives mid-generation
            late = engine.submit(Request(processor.prepare_inputs(PROMPTS[2]), config=config))
            uids[late], tokens[late] = PROMPTS[2], []
        if steps == 4:  # another is cancelled
            victim = engine.submit(Request(processor.prepare_inputs(PROMPTS[3]), config=config))
            uids[victim], tokens[victim] = PROMPTS[3], []
        if steps == 6:
            engine.cancel(victim)
        for event in engine.step():
            if event.finish_reason != "cancelled":
                tokens[event.uid].append(event.token)
            if event.finish_reason:
                finishes[event.uid] = event.finish_reason
        steps += 1
    assert finishes[victim] == "cancelled" and 0 < len(tokens[victim]) < 10
    for uid, prompt in uids.items():
        if uid == victim:
            continue
        single = [r.token for r in stream_generate(model, processor, prompt, max_tokens=10, ignore_eos=True)]
        assert tokens[uid] == single, prompt
        assert finishes[uid] == "length"


def test_a_waiting_request_can_be_cancelled(model: ToyModel) -> None:
    processor = ByteProcessor()
    engine = BatchGenerator(model, processor, max_batch_size=1)
    config = GenerationConfig(max_tokens=3, ignore_eos=True)
    running = engine.submit(Request(processor.prepare_inputs("a"), config=config))
    waiting = engine.submit(Request(processor.prepare_inputs("b"), config=config))
    engine.step()
    assert engine.waiting == 1
    engine.cancel(waiting)
    events = [e for _ in range(5) for e in engine.step()]
    assert [e.finish_reason for e in events if e.uid == waiting] == ["cancelled"]
    assert [e.finish_reason for e in events if e.uid == running][-1] == "length"
    assert not engine.has_work()


def test_batch_rows_keep_their_own_sampling(model: ToyModel) -> None:
    processor = ByteProcessor()
    engine = BatchGenerator(model, processor)
    greedy_uid = engine.submit(
        Request(processor.prepare_inputs("x"), config=GenerationConfig(max_tokens=6, ignore_eos=True))
    )
    biased = SamplingParams(logit_bias={ord("q"): 100.0})
    biased_uid = engine.submit(
        Request(processor.prepare_inputs("x"), sampling=biased, config=GenerationConfig(max_tokens=6, ignore_eos=True))
    )
    out: dict[int, list[int]] = {greedy_uid: [], biased_uid: []}
    while engine.has_work():
        for event in engine.step():
            out[event.uid].append(event.token)
    assert out[biased_uid] == [ord("q")] * 6
    assert out[greedy_uid] == [r.token for r in stream_generate(model, processor, "x", max_tokens=6, ignore_eos=True)]
