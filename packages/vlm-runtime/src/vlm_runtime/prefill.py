"""Prefill: a prompt's embeddings run through the decoder in chunks, filling its caches.

Shared by the single-stream loop, the batch engine and the speculative drafter.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import Cache
from .protocols import GenerativeModel, PromptEmbedding

__all__ = ["drop_prefix", "prefill"]


def _slice_positions(position_ids: mx.array | None, start: int, stop: int) -> mx.array | None:
    return None if position_ids is None else position_ids[..., start:stop]


def prefill(model: GenerativeModel, prompt: PromptEmbedding, cache: list[Cache], step_size: int) -> mx.array:
    """Run the prompt through the decoder in chunks of ``step_size`` tokens; return the last position's logits.

    Chunking bounds the attention scores' memory on long prompts; evaluating each chunk before building the
    next keeps the graph small.
    """
    embeds, positions, groups = prompt.inputs_embeds, prompt.position_ids, prompt.attention_groups
    length = embeds.shape[1]
    start = 0
    while length - start > step_size:
        stop = _chunk_end(groups, start + step_size)
        if stop >= length:
            break
        model.hidden_states(
            embeds[:, start:stop],
            cache=cache,
            position_ids=_slice_positions(positions, start, stop),
            attention_mask=None if prompt.attention_mask is None else prompt.attention_mask[:, :stop],
            attention_groups=_slice_positions(groups, start, stop),
        )
        mx.eval([c.state for c in cache])
        start = stop
    hidden = model.hidden_states(
        embeds[:, start:],
        cache=cache,
        position_ids=_slice_positions(positions, start, length),
        attention_mask=prompt.attention_mask,
        attention_groups=_slice_positions(groups, start, length),
    )
    return model.compute_logits(hidden[:, -1, :])


def _chunk_end(groups: mx.array | None, stop: int) -> int:
    """Move a chunk boundary past any bidirectional group it would split: the group's early tokens must see
    its later ones, so a group is prefilled in one piece."""
    if groups is None:
        return stop
    row = np.asarray(groups)
    while stop < row.shape[1] and ((row[:, stop] >= 0) & (row[:, stop] == row[:, stop - 1])).any():
        stop += 1
    return stop


def drop_prefix(prompt: PromptEmbedding, n: int) -> PromptEmbedding:
    """The prompt without its first ``n`` tokens (those a prompt cache already holds)."""
    if n == 0:
        return prompt
    mask = prompt.attention_mask
    length = prompt.inputs_embeds.shape[1]
    return PromptEmbedding(
        prompt.inputs_embeds[:, n:],
        _slice_positions(prompt.position_ids, n, length),
        mask,
        None if prompt.attention_groups is None else prompt.attention_groups[:, n:length],
    )
