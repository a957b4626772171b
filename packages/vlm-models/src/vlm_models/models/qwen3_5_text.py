"""Text-only Qwen3.5 checkpoints (``Qwen3_5ForCausalLM``; model types qwen3_5_text and qwen3_5_moe_text): the hybrid
decoder of Qwen3.5 without its vision tower, dense or, when the config names experts, sparse.

Without images every M-RoPE axis carries the same position, so the rotary is plain RoPE on the rotated part of
each head. Weights may be named as transformers' causal LM (``model.layers.*``), as the multimodal checkpoints
(``model.language_model.*``) or as MLX converters write them; ``sanitize`` takes all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime import PromptEmbedding

from ..nn.decoder import TextGeneration
from ..nn.hybrid import HybridDecoder, HybridDecoderConfig
from ..nn.moe import expert_weights, mlx_community_expert_names
from ..nn.output import ModelOutput
from ..nn.rope import Rotary
from . import qwen2_vl, qwen3_5, qwen3_5_moe


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: HybridDecoderConfig
    rope_theta: float
    tie_word_embeddings: bool


class LanguageModel(nn.Module):
    """Holds the decoder under the multimodal checkpoints' name, ``model.language_model``."""

    def __init__(self, decoder: HybridDecoder) -> None:
        super().__init__()
        self.language_model = decoder


class Model(TextGeneration, nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LanguageModel(HybridDecoder(config.text, Rotary(config.text.rotary_dim, config.rope_theta)))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        sparse = "num_experts" in config or "num_experts" in (config.get("text_config") or {})
        text = qwen3_5.normalized_text(config, qwen3_5_moe.TEXT_DEFAULTS if sparse else qwen3_5.TEXT_DEFAULTS)
        decoder = HybridDecoderConfig.from_hf(text, qwen3_5_moe.moe_config(text) if sparse else None)
        return cls(
            ModelConfig(
                model_type=str(config["model_type"]),
                text=decoder,
                rope_theta=float(text["rope_parameters"]["rope_theta"]),
                tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            )
        )

    def make_cache(self) -> list[Any]:
        return self.model.language_model.make_cache()

    def embed_prompt(
        self, input_ids: mx.array, attention_mask: mx.array | None = None, *, vision_cache: Any = None, **media: Any
    ) -> PromptEmbedding:
        given = sorted(k for k, v in media.items() if v is not None)
        if given:
            raise ValueError(f"{self.config.model_type} is a text-only checkpoint: it takes no {', '.join(given)}")
        padded = attention_mask is not None and not bool(mx.all(attention_mask).item())
        return PromptEmbedding(self.embed_tokens(input_ids), None, attention_mask if padded else None)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        return self.prompt_logits(self.embed_prompt(input_ids, attention_mask), cache, position_ids)

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Pure and idempotent."""
        out = qwen3_5.hybrid_sanitize(weights, qwen2_vl._canonical_name)
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        moe = self.config.text.moe
        if moe is None:
            return out
        return expert_weights(out, hidden=self.config.text.hidden_size, intermediate=moe.moe_intermediate_size)

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """mlx-vlm's names for this model type (``language_model.model.*``), norms as 1 + w."""
        return {
            mlx_community_expert_names(qwen2_vl._mlx_community_name(k)): v
            for k, v in qwen3_5.with_mlx_norms(weights).items()
        }
