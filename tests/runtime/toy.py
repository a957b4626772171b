"""A toy model and byte-level processor that satisfy the runtime's protocols without vlm_models.

The model is a one-layer attention network with random weights: enough to exercise caches, prefill chunking
and sampling for real, while every result can be recomputed by a full forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime import KVCache, PromptEmbedding

BOS, EOS, PAD, THINK, END_THINK = 256, 257, 258, 259, 260
VOCAB = 261  # 256 bytes + the specials above
SPECIALS = {"<think>": THINK, "</think>": END_THINK}


class ToyModel(nn.Module):
    def __init__(self, dim: int = 32, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        mx.random.seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.qkv = [nn.Linear(dim, 3 * dim) for _ in range(layers)]
        self.out = nn.Linear(dim, VOCAB)
        # Large logits make greedy choices stable under float32 rounding.
        self.out.weight = self.out.weight * 8

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.qkv]

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return self.embed(input_ids)

    def embed_prompt(self, input_ids: mx.array, *, vision_cache: Any = None) -> PromptEmbedding:
        return PromptEmbedding(self.embed(input_ids))

    def hidden_states(self, inputs_embeds, *, cache, position_ids=None, attention_mask=None, attention_groups=None):
        return self.hidden_states_and_layers(inputs_embeds, cache=cache, layers=())[0]

    def hidden_states_and_layers(
        self, inputs_embeds, *, cache, layers, position_ids=None, attention_mask=None, attention_groups=None
    ):
        """The hidden states, and those entering ``layers`` (index len(layers): the output) side by side."""
        seen = []
        h = inputs_embeds
        length = h.shape[1]
        # The rotary position of row b continues from offset + position_delta[b] (batches are left-padded).
        offset = cache[0].offset + cache[0].position_delta if cache else 0
        for i, proj in enumerate(self.qkv):
            seen.append(h)
            q, k, v = mx.split(proj(h)[:, None], 3, axis=-1)
            q = mx.fast.rope(q, q.shape[-1], traditional=False, base=10000.0, scale=1.0, offset=offset)
            k = mx.fast.rope(k, k.shape[-1], traditional=False, base=10000.0, scale=1.0, offset=offset)
            scale = q.shape[-1] ** -0.5
            if cache:
                mask = cache[i].make_mask(length, h.dtype)
                h = h + cache[i].attend(q, k, v, scale=scale, mask=mask)[:, 0]
            else:
                mask = "causal" if length > 1 else None
                h = h + mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)[:, 0]
        seen.append(h)
        features = mx.concatenate([seen[i] for i in layers], axis=-1) if layers else None
        return h, features

    def compute_logits(self, hidden: mx.array) -> mx.array:
        return self.out(hidden)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.compute_logits(self.hidden_states(self.embed(input_ids), cache=None))


class ByteProcessor:
    """Bytes in, bytes out: a token is a byte, so decoding single tokens splits UTF-8 characters."""

    eos_token_ids = frozenset({EOS})
    thinking_markers = ("<think>", "</think>")
    supports_video = False

    def prepare_inputs(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        video_sampling: Any = None,
        audios: Sequence[Any] = (),
    ) -> dict[str, mx.array]:
        if images or videos or audios:
            raise ValueError("the toy model takes no media")
        return {"input_ids": mx.array([[BOS, *self.encode(prompt)]])}

    def encode(self, text: str) -> list[int]:
        """Bytes, except the thinking markers, which are one token each."""
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(s) for s in SPECIALS) + ")"
        for piece in re.split(pattern, text):
            ids.extend([SPECIALS[piece]] if piece in SPECIALS else piece.encode("utf-8"))
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
