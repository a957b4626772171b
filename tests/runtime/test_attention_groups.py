"""Prompts with bidirectional spans (``PromptEmbedding.attention_groups``): chunked prefill never splits a span,
hands each chunk its own slice of the groups, and covers the prompt exactly once."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import PromptEmbedding
from vlm_runtime.generate import drop_prefix, prefill


class RecordingModel:
    """Records what each ``hidden_states`` call is given; returns zeros."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, np.ndarray | None]] = []

    def hidden_states(self, inputs_embeds, *, cache, position_ids=None, attention_mask=None, attention_groups=None):
        groups = None if attention_groups is None else np.array(attention_groups)
        self.calls.append((inputs_embeds.shape[1], groups))
        return mx.zeros((*inputs_embeds.shape[:2], 2))

    def compute_logits(self, hidden):
        return hidden


spans = st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(spans=spans, step=st.integers(1, 12))
def test_chunks_never_split_a_bidirectional_span(spans: list[tuple[int, bool]], step: int) -> None:
    ids: list[int] = []
    for index, (length, is_group) in enumerate(spans):
        ids += [index if is_group else -1] * length
    groups = np.array([ids], dtype=np.int32)
    model = RecordingModel()
    prompt = PromptEmbedding(mx.zeros((1, len(ids), 2)), attention_groups=mx.array(groups))
    prefill(model, prompt, [], step)
    seen = np.concatenate([g for _, g in model.calls], axis=1)
    np.testing.assert_array_equal(seen, groups)
    assert sum(n for n, _ in model.calls) == len(ids)
    start = 0
    for n, _ in model.calls[:-1]:
        start += n
        assert n >= step or start == len(ids), "only a span may stretch a chunk, never shrink it"
        assert not (ids[start] >= 0 and ids[start] == ids[start - 1]), f"a span is split at {start}"


def test_prompts_without_groups_pass_none() -> None:
    model = RecordingModel()
    prefill(model, PromptEmbedding(mx.zeros((1, 10, 2))), [], 4)
    assert [n for n, _ in model.calls] == [4, 4, 2] and all(g is None for _, g in model.calls)


def test_dropping_a_cached_prefix_drops_its_groups() -> None:
    groups = mx.array([[-1, 0, 0, 0, -1, 1, 1]])
    prompt = drop_prefix(PromptEmbedding(mx.zeros((1, 7, 2)), attention_groups=groups), 3)
    assert np.array(prompt.attention_groups).tolist() == [[0, -1, 1, 1]]
