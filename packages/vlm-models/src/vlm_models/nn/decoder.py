"""A Llama-style text decoder (embeddings, pre-norm layers, final norm) parameterised by its config.

Qwen2, Llama and Mistral language models differ only in sizes, biases and the rotary scheme, so they share
this class; families pass in their rotary embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import KVCache, PromptEmbedding
from vlm_runtime.masks import attention_mask_for

from ..family import FamilyDefaults
from .layers import Attention, DecoderLayer, GatedMLP
from .moe import MoEConfig, SparseMoE
from .output import ModelOutput
from .rope import MultimodalRotary, Rotate

__all__ = [
    "DecoderConfig",
    "LayerTaps",
    "TextDecoder",
    "TextGeneration",
    "no_attention_groups",
    "padded_prompt_embedding",
    "rotation",
]


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    head_dim: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys (Qwen3)."""
    moe: MoEConfig | None = None
    """Sparse mixture-of-experts MLPs in the layers ``moe.is_sparse`` picks; the others keep the gated MLP."""

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def padded_prompt_embedding(inputs_embeds: mx.array, attention_mask: mx.array | None) -> PromptEmbedding:
    """A plain-RoPE prompt: positions follow the cache unless the batch is padded; then each row counts only its
    real tokens (padding sits at position 1), as transformers' generate does."""
    mask = None if attention_mask is None else np.asarray(attention_mask)
    if mask is None or mask.all():
        return PromptEmbedding(inputs_embeds)
    positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
    return PromptEmbedding(inputs_embeds, mx.array(positions), attention_mask)


class TextDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, rotary: MultimodalRotary) -> None:
        super().__init__()
        self.config = config
        head_dim = config.attention_head_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [
            DecoderLayer(
                Attention(
                    config.hidden_size,
                    config.num_attention_heads,
                    config.num_key_value_heads,
                    head_dim,
                    qkv_bias=config.attention_bias,
                    qk_norm=(lambda dim: nn.RMSNorm(dim, eps=config.rms_norm_eps)) if config.qk_norm else None,
                ),
                self._mlp(config, i),
                config.hidden_size,
                config.rms_norm_eps,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rotary = rotary

    @staticmethod
    def _mlp(config: DecoderConfig, layer: int) -> nn.Module:
        if config.moe is not None and config.moe.is_sparse(layer):
            return SparseMoE(config.hidden_size, config.moe, config.hidden_act)
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def __call__(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        layer_additions: Sequence[mx.array] = (),
        taps: LayerTaps | None = None,
    ) -> mx.array:
        """``layer_additions[i]`` is added to the hidden states after layer i (Qwen3-VL's deepstack); ``taps``
        collects the hidden states entering the layers it names (speculative drafters read them)."""
        length = inputs_embeds.shape[1]
        rotate = rotation(self._rotary, cache, position_ids, length)
        if cache:
            # Sliding windows, quantized storage and batch padding each shape the mask their own way.
            mask = cache[0].make_mask(length, inputs_embeds.dtype, key_padding=attention_mask)
        else:
            mask = attention_mask_for(length, inputs_embeds.dtype, key_padding=attention_mask)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if taps is not None:
                taps.see(i, h)
            h = layer(h, rotate, mask, cache[i] if cache else None)
            if i < len(layer_additions):
                h = h + layer_additions[i]
        if taps is not None:
            taps.see(len(self.layers), h)
        return self.norm(h)


class LayerTaps:
    """The hidden states entering chosen decoder layers during one forward pass (layer index ``n_layers``: the
    last layer's output, before the final norm), as EAGLE-3 drafters number them."""

    def __init__(self, layers: Sequence[int], n_layers: int) -> None:
        outside = [i for i in layers if not 0 <= i <= n_layers]
        if outside:
            raise ValueError(f"cannot read the hidden states of layers {outside}: the model has {n_layers} layers")
        self.layers = tuple(layers)
        self._seen: dict[int, mx.array] = {}

    def see(self, layer: int, hidden: mx.array) -> None:
        if layer in self.layers:
            self._seen[layer] = hidden

    def features(self) -> mx.array:
        """(batch, length, hidden * len(layers)): the taps in the order asked for."""
        return mx.concatenate([self._seen[i] for i in self.layers], axis=-1)


def no_attention_groups(groups: mx.array | None) -> None:
    """Decoders of purely causal families have no bidirectional spans to honour: refuse them, never ignore."""
    if groups is not None:
        raise ValueError("this model's decoder is causal: it takes no attention_groups")


class TextGeneration(FamilyDefaults):
    """The runtime's decoder steps for a family model holding its ``TextDecoder`` at ``self.model.language_model``
    and, unless ``self.config.tie_word_embeddings``, an ``lm_head``."""

    model: Any
    config: Any

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.language_model.layers]

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return self.model.language_model.embed_tokens(input_ids)

    def hidden_states(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> mx.array:
        return self._decode(inputs_embeds, cache, position_ids, attention_mask, attention_groups, None)

    def hidden_states_and_layers(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        layers: Sequence[int],
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """``hidden_states``, and the hidden states entering ``layers`` side by side (``LayerTaps``)."""
        taps = LayerTaps(layers, len(self.model.language_model.layers))
        hidden = self._decode(inputs_embeds, cache, position_ids, attention_mask, attention_groups, taps)
        return hidden, taps.features()

    def _decode(
        self,
        inputs_embeds: mx.array,
        cache: list[Any] | None,
        position_ids: mx.array | None,
        attention_mask: mx.array | None,
        attention_groups: mx.array | None,
        taps: LayerTaps | None,
    ) -> mx.array:
        no_attention_groups(attention_groups)
        return self.model.language_model(
            inputs_embeds, cache=cache, position_ids=position_ids, attention_mask=attention_mask, taps=taps
        )

    def compute_logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.language_model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)  # type: ignore[attr-defined]

    def prompt_logits(
        self, prompt: PromptEmbedding, cache: list[Any] | None = None, position_ids: mx.array | None = None
    ) -> ModelOutput:
        """The Hugging Face forward once the prompt is embedded: logits at every position."""
        if position_ids is None:
            position_ids = prompt.position_ids
        hidden = self.hidden_states(
            prompt.inputs_embeds, cache=cache, position_ids=position_ids, attention_mask=prompt.attention_mask
        )
        return ModelOutput(logits=self.compute_logits(hidden))


def rotation(
    rotary: MultimodalRotary, cache: list[Any] | None, position_ids: mx.array | None, length: int, reference: int = 0
) -> Rotate:
    """The rotation of the next ``length`` tokens: at explicit ``position_ids`` (every layer's cache then records
    where later tokens continue), else continuing from ``cache[reference]``'s offset and position delta."""
    offset = cache[reference].offset if cache else 0
    if position_ids is not None:
        if cache:
            _record_position_delta(cache, position_ids, offset + length)
        return rotary.at_positions(position_ids)
    delta = cache[reference].position_delta if cache else 0
    return rotary.at_offset(offset + delta)


def _record_position_delta(cache: list[Any], position_ids: mx.array, n_tokens: int) -> None:
    """Later tokens continue from the last explicit position: store (max position + 1) - tokens seen, per row."""
    batch = position_ids.shape[-2]
    last = position_ids.reshape(-1, batch, position_ids.shape[-1]).max(axis=(0, 2))
    delta: mx.array | int = last + 1 - n_tokens
    if batch == 1:
        # A plain int keeps the per-token rotary offset free of an extra device op (one sync, at prefill).
        delta = int(delta.item())
    for c in cache:
        c.position_delta = delta
