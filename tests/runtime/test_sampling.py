"""Logits processors, logprob helpers, seeded sampling and stop strings, against naive references."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlm_runtime.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)
from vlm_runtime.stopping import MAX_STOP_LENGTH, MAX_STOP_STRINGS, StopStrings

FAST = settings(max_examples=40, deadline=None)


# --- strategies and references -------------------------------------------------------------------------------


@st.composite
def histories(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """Random logits (B, V) and token histories (B, T) left-padded with -1, plus a generated-token count."""
    batch, vocab, width = draw(st.integers(1, 3)), draw(st.integers(2, 24)), draw(st.integers(0, 12))
    tokens = np.full((batch, width), -1, np.int32)
    for b in range(batch):
        row = draw(st.lists(st.integers(0, vocab - 1), max_size=width))
        if row:
            tokens[b, width - len(row) :] = row
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    logits[rng.random((batch, vocab)) < 0.1] = 0.0  # the sign rule's boundary
    n_generated = draw(st.integers(0, width))
    return logits, tokens, n_generated


def ref_repetition(logits: np.ndarray, tokens: np.ndarray, penalty: float, context: int) -> np.ndarray:
    out = logits.copy()
    for b in range(len(logits)):
        window = tokens[b, tokens.shape[1] - min(context, tokens.shape[1]) :]
        for t in {int(t) for t in window if t >= 0}:
            out[b, t] = out[b, t] / np.float32(penalty) if out[b, t] > 0 else out[b, t] * np.float32(penalty)
    return out


def ref_presence_frequency(
    logits: np.ndarray, tokens: np.ndarray, n: int, presence: float, frequency: float
) -> np.ndarray:
    out = logits.copy()
    for b in range(len(logits)):
        counts = Counter(int(t) for t in tokens[b, tokens.shape[1] - n :] if t >= 0)
        for t, c in counts.items():
            out[b, t] -= np.float32(presence + frequency * c)
    return out


def ref_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    out = logits.copy()
    for t, v in bias.items():
        out[:, t] += np.float32(v)
    return out


def close(a: mx.array, b: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(a), b, rtol=1e-5, atol=1e-5)


# --- params --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"repetition_penalty": float("nan")},
        {"repetition_context_size": 0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.1},
        {"frequency_penalty": float("nan")},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {1: float("nan")}},
        {"logit_bias": {1: float("inf")}},
        {"logit_bias": [(1, 1.0), (1, 2.0)]},
        {"logit_bias": {"a": 1.0}},
    ],
)
def test_sampling_params_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_stays_hashable_and_normalises_logit_bias() -> None:
    as_dict = SamplingParams(logit_bias={5: -1.0, 2: 0.5})
    as_pairs = SamplingParams(logit_bias=[(2, 0.5), (5, -1.0)])
    assert as_dict == as_pairs and hash(as_dict) == hash(as_pairs)
    assert as_dict.logit_bias == ((2, 0.5), (5, -1.0))
    assert SamplingParams(logit_bias={}).logit_bias is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3, repetition_context_size=64),
        SamplingParams(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={}),
    ],
)
def test_no_processors_when_all_are_off(params: SamplingParams) -> None:
    assert make_logits_processors(params) == []


# --- processors ----------------------------------------------------------------------------------------------


@FAST
@given(h=histories(), penalty=st.floats(0.1, 3.0), context=st.integers(1, 16))
def test_repetition_penalty_matches_reference(h, penalty: float, context: int) -> None:
    logits, tokens, _ = h
    out = apply_repetition_penalty(mx.array(logits), mx.array(tokens), penalty, context)
    close(out, ref_repetition(logits, tokens, penalty, context))


@FAST
@given(h=histories(), presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_presence_frequency_matches_reference(h, presence: float, frequency: float) -> None:
    logits, tokens, n = h
    out = apply_presence_frequency(mx.array(logits), mx.array(tokens), n, presence, frequency)
    close(out, ref_presence_frequency(logits, tokens, n, presence, frequency))


@FAST
@given(h=histories(), data=st.data())
def test_logit_bias_matches_reference(h, data) -> None:
    logits, _, _ = h
    vocab = logits.shape[1]
    value = st.one_of(st.floats(-10, 10), st.just(float("-inf")))
    bias = data.draw(st.dictionaries(st.integers(0, vocab - 1), value, max_size=5))
    close(apply_logit_bias(mx.array(logits), bias), ref_logit_bias(logits, bias))
    with pytest.raises(ValueError):
        apply_logit_bias(mx.array(logits), {vocab: 1.0})


@FAST
@given(
    h=histories(),
    penalty=st.sampled_from([1.0, 0.5, 1.3]),
    context=st.integers(1, 16),
    presence=st.sampled_from([0.0, 0.7]),
    frequency=st.sampled_from([0.0, -0.4]),
    biased=st.booleans(),
)
def test_processor_list_composes_the_active_rules(h, penalty, context, presence, frequency, biased) -> None:
    logits, tokens, n = h
    bias = {0: -3.0, logits.shape[1] - 1: 1.5} if biased else None
    params = SamplingParams(
        repetition_penalty=penalty,
        repetition_context_size=context,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logit_bias=bias,
    )
    processors = make_logits_processors(params)
    assert len(processors) == (penalty != 1.0) + (presence != 0.0 or frequency != 0.0) + biased
    out = mx.array(logits)
    for process in processors:
        out = process(out, mx.array(tokens), n)
    ref = ref_presence_frequency(ref_repetition(logits, tokens, penalty, context), tokens, n, presence, frequency)
    close(out, ref_logit_bias(ref, bias or {}))


def test_processors_keep_the_logits_dtype() -> None:
    logits = mx.array([[1.0, -2.0, 0.5, 3.0]], mx.bfloat16)
    tokens = mx.array([[-1, 0, 1, 1]], mx.int32)
    params = SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={3: -1})
    for process in make_logits_processors(params):
        logits = process(logits, tokens, 2)
        assert logits.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(logits.astype(mx.float32)), [[1 / 1.2, -2.4 - 1.5, 0.5, 2.0]], rtol=1e-2)


# --- logprob helpers -----------------------------------------------------------------------------------------


@FAST
@given(
    batch=st.integers(1, 3),
    vocab=st.integers(1, 60),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    tied=st.booleans(),
)
def test_top_logprobs_matches_full_sort(batch: int, vocab: int, k: int, seed: int, tied: bool) -> None:
    assume(k <= vocab)
    rng = np.random.default_rng(seed)
    lp = rng.standard_normal((batch, vocab)).astype(np.float32)
    if tied:  # few distinct values: ties at the cut
        lp = np.round(lp).astype(np.float32)
    ids, values = top_logprobs(mx.array(lp), k)
    ids, values = np.array(ids), np.array(values)
    assert ids.shape == values.shape == (batch, k)
    np.testing.assert_array_equal(values, -np.sort(-lp, axis=-1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(lp, ids, axis=-1), values)
    assert all(len(set(row.tolist())) == k for row in ids)


@pytest.mark.parametrize("k", [0, 21, -1])
def test_top_logprobs_rejects_bad_k(k: int) -> None:
    with pytest.raises(ValueError):
        top_logprobs(mx.zeros((1, 50)), k)


def test_top_logprobs_rejects_k_above_vocab() -> None:
    with pytest.raises(ValueError):
        top_logprobs(mx.zeros((1, 3)), 4)


# --- seeded sampling -----------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed_a=st.integers(0, 2**31 - 1), seed_b=st.integers(0, 2**31 - 1), top_k=st.sampled_from([0, 500]))
def test_seeded_sampling_repeats_and_depends_on_the_seed(seed_a: int, seed_b: int, top_k: int) -> None:
    assume(seed_a != seed_b)
    spread = mx.full((2, 1000), -np.log(1000.0))  # uniform: two seeds agreeing by chance is ~impossible

    def draws(seed: int, disturb: bool) -> list[list[int]]:
        sampler = make_sampler(SamplingParams(temperature=1.0, top_k=top_k, seed=seed))
        out = []
        for _ in range(8):
            if disturb:  # the global random state must not matter
                mx.random.normal((4,))
            out.append(sampler(spread).tolist())
        return out

    first = draws(seed_a, disturb=False)
    assert draws(seed_a, disturb=True) == first
    assert draws(seed_b, disturb=False) != first


# --- stop strings --------------------------------------------------------------------------------------------

ALPHABET = "ab é日😀\n"
# Two letters make self-overlapping stops ("aab" in "aaab") and partial matches frequent.
ALPHABETS = st.sampled_from(["ab", ALPHABET])


def ref_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The first stop string to complete (longest on a tie) cuts the text at its start."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))], True
    return text, False


def ref_hold(consumed: str, stops: list[str]) -> int:
    return max(
        (n for n in range(1, len(consumed) + 1) for s in stops if n < len(s) and s.startswith(consumed[-n:])),
        default=0,
    )


@st.composite
def stop_cases(draw) -> tuple[str, list[str], list[str]]:
    alphabet = draw(ALPHABETS)
    text = draw(st.text(alphabet=alphabet, max_size=40))
    stops = []
    for _ in range(draw(st.integers(1, 4))):
        if text and draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            stops.append(text[i : draw(st.integers(i + 1, min(len(text), i + 6)))])
        else:
            stops.append(draw(st.text(alphabet=alphabet, min_size=1, max_size=5)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if a < b] if text else []
    if draw(st.booleans()):  # empty feeds in between
        chunks = [c for chunk in chunks for c in (chunk, "")]
    return text, stops, chunks


@settings(max_examples=150, deadline=None)
@given(case=stop_cases())
def test_stop_strings_stream_matches_reference(case) -> None:
    text, stops, chunks = case
    assert "".join(chunks) == text
    matcher = StopStrings(stops)
    longest = max(map(len, stops))
    emitted, consumed, hit = [], "", False
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        emitted.append(out)
        consumed += chunk
        if hit:
            break
        # Holds back exactly the longest suffix that could still start a stop string, and nothing else.
        assert len(matcher.held_back) == ref_hold(consumed, stops) < longest
        assert "".join(emitted) + matcher.held_back == consumed
    if hit:
        assert matcher.feed("more") == ("", True)
        assert matcher.matched in stops
    else:
        emitted.append(matcher.flush())
    streamed = "".join(emitted)
    assert (streamed, hit) == ref_stop(text, stops)
    assert not any(s in streamed for s in stops)


def test_stop_strings_first_completion_wins() -> None:
    # "b" completes before "abc" could, and generation stops right there.
    matcher = StopStrings(["abc", "b"])
    assert matcher.feed("xa") == ("x", False)
    assert matcher.feed("bc") == ("a", True)
    assert matcher.matched == "b"
    # At the same completion point the longer (earlier-starting) stop wins.
    matcher = StopStrings(["c", "abc"])
    assert matcher.feed("a") == ("", False)
    assert matcher.feed("b") == ("", False)
    assert matcher.feed("cd") == ("", True)
    assert matcher.matched == "abc"


def test_stop_strings_holds_the_longest_self_overlapping_prefix() -> None:
    matcher = StopStrings(["aab"])
    assert matcher.feed("xaaa") == ("xa", False)
    assert matcher.held_back == "aa"
    assert matcher.feed("b!") == ("", True)  # the whole stream emitted "xa": everything before "aab"


def test_stop_strings_flush_releases_partial_match() -> None:
    matcher = StopStrings("</answer>")
    assert matcher.feed("42 </ans") == ("42 ", False)
    assert matcher.held_back == "</ans"
    assert matcher.flush() == "</ans"
    assert matcher.flush() == ""


@pytest.mark.parametrize(
    "stops", [[""], ["ok", ""], ["x" * (MAX_STOP_LENGTH + 1)], [str(i) for i in range(MAX_STOP_STRINGS + 1)]]
)
def test_stop_strings_rejects_bad_input(stops: list[str]) -> None:
    with pytest.raises(ValueError):
        StopStrings(stops)


def test_stop_strings_of_common_shapes() -> None:
    assert StopStrings.of(None) is None and StopStrings.of([]) is None
    assert StopStrings.of("END").stops == ("END",)
    assert StopStrings.of(["a", "a", "b"]).stops == ("a", "b")
