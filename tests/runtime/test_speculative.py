"""Speculative decoding follows the target alone: greedy text equals plain greedy decoding token for token
(whatever the drafter, the draft length, the cache kind, the logits processors, stop strings, thinking budget
and logprobs), sampling keeps the target's distribution, rejected tokens leave no trace in the caches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import ArraysCache, PromptCache, SamplingParams, stream_generate
from vlm_runtime.sampling import make_distribution
from vlm_runtime.speculative import DraftSchedule, _choice

from .toy import END_THINK, EOS, THINK, ByteProcessor, ToyModel

TARGET = ToyModel(layers=2, seed=3)
SAME = ToyModel(layers=2, seed=3)  # agrees with the target everywhere
OTHER = ToyModel(layers=1, seed=11)  # mostly disagrees
PROCESSOR = ByteProcessor()


def run(prompt: str, draft=None, **options):
    options.setdefault("ignore_eos", True)
    return list(stream_generate(TARGET, PROCESSOR, prompt, draft_model=draft, **options))


def tokens(results) -> list[int]:
    return [r.token for r in results]


@settings(max_examples=10, deadline=None)
@given(
    prompt=st.text(alphabet="abcdefgh xyz.", min_size=1, max_size=30),
    max_tokens=st.integers(1, 60),
    draft=st.sampled_from(["same", "other"]),
    n=st.integers(1, 7),
)
def test_greedy_tokens_equal_plain_decoding(prompt: str, max_tokens: int, draft: str, n: int) -> None:
    drafter = SAME if draft == "same" else OTHER
    plain = run(prompt, max_tokens=max_tokens)
    fast = run(prompt, drafter, max_tokens=max_tokens, num_draft_tokens=n)
    assert tokens(fast) == tokens(plain)
    assert [r.text for r in fast] == [r.text for r in plain]


def test_a_drafter_that_agrees_has_every_proposal_accepted() -> None:
    results = run("the same model", SAME, max_tokens=64, num_draft_tokens=4)
    last = results[-1]
    assert last.draft_tokens > 40 and last.accepted_draft_tokens == last.draft_tokens


def test_a_drafter_that_keeps_missing_is_paused() -> None:
    results = run("another model", OTHER, max_tokens=200, num_draft_tokens=4)
    last = results[-1]
    assert last.accepted_draft_tokens < last.draft_tokens
    assert last.draft_tokens < 120, "the schedule should stop drafting for a drafter this wrong"


@pytest.mark.parametrize(
    "options",
    [
        dict(repetition_penalty=1.3, presence_penalty=0.5, logit_bias={ord("a"): 3.0}),
        dict(stop=["aa", "xyz"], ignore_eos=False),
        dict(logprobs=True, top_logprobs=3),
        dict(kv_bits=8, kv_group_size=32),
        dict(max_kv_size=24),  # wraps mid-answer: drafts shorten, then decoding goes on plainly
    ],
    ids=["processors", "stop", "logprobs", "quantized-kv", "window"],
)
@pytest.mark.parametrize("drafter", [SAME, OTHER], ids=["same", "other"])
def test_request_rules_and_cache_kinds_are_kept(options, drafter) -> None:
    plain = run("rules hold", max_tokens=40, **options)
    fast = run("rules hold", drafter, max_tokens=40, num_draft_tokens=5, **options)
    assert tokens(fast) == tokens(plain)
    assert [(r.text, r.finish_reason, r.stop_string) for r in fast] == [
        (r.text, r.finish_reason, r.stop_string) for r in plain
    ]
    for a, b in zip(fast, plain):
        assert (a.logprob is None) == (b.logprob is None)
        if a.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_the_thinking_budget_closes_the_block_at_the_same_token() -> None:
    prompt = "think" + "<think>"
    options = dict(max_tokens=30, thinking_budget=5)
    plain, fast = run(prompt, **options), run(prompt, SAME, num_draft_tokens=4, **options)
    assert tokens(fast) == tokens(plain)
    assert END_THINK in tokens(plain) and THINK not in tokens(plain)[:1]
    assert "".join(r.reasoning for r in fast) == "".join(r.reasoning for r in plain)


def test_an_early_end_leaves_the_cache_as_plain_decoding_would() -> None:
    """Stopping inside an accepted run (a stop string) trims what the target verified past it, so the prompt
    cache's next turn reuses exactly the emitted conversation."""
    turns = {}
    for draft in (None, SAME):
        cache = PromptCache()
        first = run("hello", draft, max_tokens=30, stop=["l"], prompt_cache=cache)
        follow = "hello" + "".join(r.text for r in first) + " again"
        second = run(follow, draft, max_tokens=12, prompt_cache=cache)
        turns[draft is None] = (tokens(first), tokens(second), second[-1].cached_tokens)
    assert turns[True] == turns[False]


def test_a_window_the_prompt_already_filled_is_refused_with_one_line() -> None:
    with pytest.raises(ValueError, match="sliding window not once the prompt has filled it"):
        run("a prompt longer than the window", SAME, max_tokens=4, max_kv_size=8)


def test_recurrent_caches_are_refused_with_one_line() -> None:
    class Recurrent(ToyModel):
        def make_cache(self):
            return [ArraysCache(1) for _ in self.qkv]

    with pytest.raises(ValueError, match="ArraysCache layers cannot"):
        list(stream_generate(Recurrent(), PROCESSOR, "x", max_tokens=4, draft_model=SAME))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)])
def test_rejection_keeps_the_target_distribution(params: SamplingParams) -> None:
    """Whatever the proposal, the token a verified position yields is distributed as the target's p."""
    logits = mx.array([[2.0, 1.5, 0.3, -0.5, 1.0, 0.0, -1.0]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    p = np.array(make_distribution(params)(logprobs))[0]
    key = [mx.random.key(7)]
    draws = 6000
    for proposal in (0, 3, 6):
        counts = np.zeros_like(p)
        for _ in range(draws):
            counts[int(_choice(logprobs, proposal, make_distribution(params), params, key).item())] += 1
        np.testing.assert_allclose(counts / draws, p, atol=0.025, err_msg=f"proposal {proposal}")


def test_sampled_generation_follows_the_target_distribution() -> None:
    """End to end: the second token (decided by the rejection rule, after a proposal) has the distribution of
    plain sampling's second token."""
    params = dict(temperature=1.0, max_tokens=2)
    plain, fast = np.zeros(300), np.zeros(300)
    for seed in range(400):
        plain[run("ab", seed=seed, **params)[1].token] += 1
        fast[run("ab", OTHER, seed=10_000 + seed, **params)[1].token] += 1
    assert np.abs(plain / 400 - fast / 400).max() < 0.09
    assert (plain > 0).sum() > 3  # a real distribution, not one token


def test_draft_schedule_grows_shrinks_and_pauses() -> None:
    schedule = DraftSchedule(most=4, window=8, min_rate=0.25, pause=5)
    assert schedule.next() == 4
    schedule.record(4, 1)
    assert schedule.next() == 2
    schedule.record(2, 2)
    assert schedule.next() == 3
    for _ in range(4):
        schedule.record(3, 0)
    assert [schedule.next() for _ in range(6)] == [0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError):
        DraftSchedule(most=0)


def test_eos_inside_a_draft_ends_the_answer_there() -> None:
    plain = run("eos", max_tokens=80, ignore_eos=False, logit_bias={EOS: 4.0})
    fast = run("eos", SAME, max_tokens=80, ignore_eos=False, logit_bias={EOS: 4.0}, num_draft_tokens=6)
    assert tokens(fast) == tokens(plain) and plain[-1].finish_reason == "stop"
