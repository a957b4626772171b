"""Invariants of caches, masks, samplers and the streaming detokenizer, against naive references."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlm_runtime import KVCache
from vlm_runtime.detokenizer import StreamingDetokenizer
from vlm_runtime.masks import block_diagonal_mask, causal_mask, padded_causal_mask
from vlm_runtime.sampling import SamplingParams, apply_min_p, apply_top_k, apply_top_p, make_sampler

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(
    chunks=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    trims=st.lists(st.integers(0, 50), min_size=0, max_size=3),
)
def test_kv_cache_matches_concatenation(chunks: list[int], trims: list[int]) -> None:
    cache, keys_ref, rng = KVCache(), np.zeros((1, 2, 0, 4), np.float32), np.random.default_rng(0)
    for i, n in enumerate(chunks):
        k = rng.standard_normal((1, 2, n, 4)).astype(np.float32)
        keys, values = cache.update_and_fetch(mx.array(k), mx.array(-k))
        keys_ref = np.concatenate([keys_ref, k], axis=2)
        np.testing.assert_array_equal(np.array(keys), keys_ref)
        np.testing.assert_array_equal(np.array(values), -keys_ref)
        assert cache.offset == keys_ref.shape[2]
        if i < len(trims):
            dropped = cache.trim(trims[i])
            assert dropped == min(trims[i], keys_ref.shape[2])
            keys_ref = keys_ref[:, :, : keys_ref.shape[2] - dropped]
            assert cache.offset == keys_ref.shape[2]
    assert cache.nbytes == 2 * keys_ref.nbytes


@FAST
@given(n=st.integers(1, 20), offset=st.integers(0, 20))
def test_causal_mask(n: int, offset: int) -> None:
    mask = np.array(causal_mask(n, offset))
    ref = np.array([[k <= offset + q for k in range(offset + n)] for q in range(n)])
    np.testing.assert_array_equal(mask, ref)


@FAST
@given(pads=st.lists(st.integers(0, 5), min_size=1, max_size=3), length=st.integers(6, 10))
def test_padded_causal_mask_hides_padding(pads: list[int], length: int) -> None:
    key_padding = mx.array([[0] * p + [1] * (length - p) for p in pads])
    mask = np.array(padded_causal_mask(key_padding, length))
    for b, p in enumerate(pads):
        for q in range(length):
            for k in range(length):
                assert mask[b, 0, q, k] == (k <= q and k >= p)


@FAST
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5))
def test_block_diagonal_mask(lengths: list[int]) -> None:
    bounds = [0, *np.cumsum(lengths).tolist()]
    if bounds[-1] == 0:
        return
    if len(lengths) == 1:
        assert block_diagonal_mask(bounds) is None
        return
    mask = np.array(block_diagonal_mask(bounds))
    segment = np.repeat(np.arange(len(lengths)), lengths)
    np.testing.assert_array_equal(mask, segment[:, None] == segment[None, :])


def logprobs_strategy():
    return st.lists(st.floats(-20, 5, allow_nan=False), min_size=2, max_size=40).map(
        lambda xs: np.asarray(xs, np.float32) - np.logaddexp.reduce(np.asarray(xs, np.float32))
    )


@FAST
@given(lp=logprobs_strategy(), k=st.integers(1, 50))
def test_top_k_keeps_exactly_k(lp: np.ndarray, k: int) -> None:
    out = np.array(apply_top_k(mx.array(lp[None]), k))[0]
    kept = np.isfinite(out)
    assert kept.sum() == min(k, len(lp))
    # Every kept token is at least as likely as every dropped one.
    if (~kept).any():
        assert lp[kept].min() >= lp[~kept].max()
    np.testing.assert_array_equal(out[kept], lp[kept])


@FAST
@given(lp=logprobs_strategy(), p=st.floats(0.01, 0.99))
def test_top_p_keeps_smallest_set_reaching_p(lp: np.ndarray, p: float) -> None:
    probs = np.exp(lp.astype(np.float64))
    sorted_probs = np.sort(probs)[::-1]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    # Cases that sit on a rounding boundary or have ties at the cut say nothing about the rule.
    assume(np.abs(mass_before - p).min() > 1e-4)
    need = int((mass_before < p).sum())
    assume(need == len(lp) or sorted_probs[need - 1] - sorted_probs[need] > 1e-6)
    out = np.array(apply_top_p(mx.array(lp[None]), p))[0]
    kept = np.isfinite(out)
    assert kept.sum() == need
    assert probs[kept].sum() >= p
    np.testing.assert_array_equal(np.sort(probs[kept])[::-1], sorted_probs[:need])


@FAST
@given(lp=logprobs_strategy(), min_p=st.floats(0.0, 1.0))
def test_min_p(lp: np.ndarray, min_p: float) -> None:
    out = np.array(apply_min_p(mx.array(lp[None]), min_p))[0]
    kept = np.isfinite(out)
    threshold = np.exp(lp.max()) * min_p
    if min_p <= 0:
        assert kept.all()
        return
    # Within rounding of the threshold either choice is right (the sampler compares logprobs, not probs).
    probs = np.exp(lp)
    assert kept[probs >= threshold * (1 + 1e-5)].all()
    assert not kept[probs < threshold * (1 - 1e-5)].any()


@FAST
@given(lp=logprobs_strategy(), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5))
def test_sampled_tokens_lie_in_the_kept_set(lp: np.ndarray, seed: int, k: int) -> None:
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=k, seed=seed))
    tokens = [int(sampler(mx.array(lp[None])).item()) for _ in range(5)]
    top = set(np.argsort(-lp, kind="stable")[: min(k, len(lp))].tolist())
    ties = set(np.nonzero(lp >= np.sort(lp)[::-1][min(k, len(lp)) - 1])[0].tolist())
    assert set(tokens) <= top | ties


@settings(max_examples=60, deadline=None)
# U+FFFD itself is left out: a text that really contains it is indistinguishable from a cut character, so the
# detokenizer holds it back until the next token (it still comes out, but not in its own piece). Surrogates (Cs)
# too: they have no UTF-8 encoding, and st.characters (unlike st.text's default alphabet) would draw them.
@given(
    text=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), min_size=0, max_size=40
    )
)
def test_detokenizer_round_trips_unicode_bytewise(text: str) -> None:
    data = text.encode("utf-8")
    detok = StreamingDetokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [detok.add_token(b) for b in data]
    pieces.append(detok.finalize())
    assert "".join(pieces) == text
    # No piece ever carries half a character.
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from([" the", " cat", "s", " é", "\n", " 日本", "!"]), max_size=30))
def test_detokenizer_keeps_leading_spaces_of_sentencepiece_style_tokens(words: list[str]) -> None:
    """Tokenizers that drop the first token's leading space still stream the text they decode as a whole."""
    vocab = sorted(set(words))

    def decode(ids):
        return "".join(vocab[i] for i in ids).removeprefix(" ")

    ids = [vocab.index(w) for w in words]
    detok = StreamingDetokenizer(decode)
    streamed = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert streamed == decode(ids)
