"""Prefill: a prompt's embeddings run through the decoder in chunks, filling its caches.

Shared by the single-stream loop, the batch engine and the speculative drafter.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .cache import Cache
from .protocols import GenerativeModel, PromptEmbedding

__all__ = ["drop_prefix", "prefill", "prefill_with_layers"]


def _slice_positions(position_ids: mx.array | None, start: int, stop: int) -> mx.array | None:
    return None if position_ids is None else position_ids[..., start:stop]


def prefill(model: GenerativeModel, prompt: PromptEmbedding, cache: list[Cache], step_size: int) -> mx.array:
    """Run the prompt through the decoder in chunks of ``step_size`` tokens; return the last position's logits.

    Chunking bounds the attention scores' memory on long prompts; evaluating each chunk before building the
    next keeps the graph small.
    """
    return prefill_with_layers(model, prompt, cache, step_size, ())[0]


def prefill_with_layers(
    model: GenerativeModel, prompt: PromptEmbedding, cache: list[Cache], step_size: int, layers: Sequence[int]
) -> tuple[mx.array, mx.array | None]:
    """``prefill``, and with ``layers`` the hidden states entering them at every prompt position (the model
    must be ``ExposesLayers``): what a drafter reading the target's features starts from."""
    embeds, positions, groups = prompt.inputs_embeds, prompt.position_ids, prompt.attention_groups
    length = embeds.shape[1]
    start = 0
    features: list[mx.array] = []

    def run(stop: int, attention_mask: mx.array | None) -> mx.array:
        options = dict(
            cache=cache,
            position_ids=_slice_positions(positions, start, stop),
            attention_mask=attention_mask,
            attention_groups=_slice_positions(groups, start, stop),
        )
        if not layers:
            return model.hidden_states(embeds[:, start:stop], **options)
        hidden, tapped = model.hidden_states_and_layers(embeds[:, start:stop], layers=layers, **options)  # type: ignore[attr-defined]
        features.append(tapped)
        return hidden

    while length - start > step_size:
        stop = _chunk_end(groups, start + step_size)
        if stop >= length:
            break
        run(stop, None if prompt.attention_mask is None else prompt.attention_mask[:, :stop])
        mx.eval([c.state for c in cache], features)
        start = stop
    hidden = run(length, prompt.attention_mask)
    logits = model.compute_logits(hidden[:, -1, :])
    return logits, mx.concatenate(features, axis=1) if features else None


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
