"""PaliGemma 2: SigLIP patch features, linearly projected, in front of a Gemma 2 decoder (soft-capped
attention and logits, alternating sliding and global layers). The prompt is a prefix that attends to itself both
ways; generated tokens attend causally. Positions count from 1.

Only what differs from Gemma 3 lives here: the config, the projector and the prefix groups. PaliGemma 1 (a Gemma 1
decoder) is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, text_section
from ..nn.gemma import GEMMA_DEFAULTS, GemmaDecoderConfig
from ..nn.siglip import SiglipVisionConfig
from . import gemma3

TEXT_DEFAULTS = {
    **GEMMA_DEFAULTS,  # and transformers' Gemma2Config's own, with PaliGemma's vocabulary
    "vocab_size": 257_216,
    "sliding_window_pattern": 2,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rope_theta": 10_000.0,
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: GemmaDecoderConfig
    vision: SiglipVisionConfig
    projection_dim: int
    image_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = text_section(config)
        text_type = (config.get("text_config") or {}).get("model_type", "gemma2")
        if text_type != "gemma2":
            raise ConfigError(f"PaliGemma with a {text_type!r} text model is not supported (PaliGemma 2 uses gemma2)")
        vision_values = dict(config.get("vision_config") or {})
        vision = SiglipVisionConfig.from_hf(vision_values)
        return cls(
            model_type=str(config.get("model_type")),
            text=GemmaDecoderConfig.from_hf(
                text, defaults=TEXT_DEFAULTS, qk_norm=False, first_position=1, window_limits_groups=False
            ),
            vision=vision,
            # transformers copies the top-level value into the vision config; it wins.
            projection_dim=int(config.get("projection_dim") or vision_values.get("projection_dim") or 2048),
            image_token_id=int(config.get("image_token_index", config.get("image_token_id", 257_152))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        )


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.vision.hidden_size, config.projection_dim)

    def __call__(self, patches: mx.array) -> mx.array:
        return self.linear(patches)


class PaliGemmaModel(gemma3.Gemma3Model):
    projector = MultiModalProjector


class Model(gemma3.Model):
    config_class = ModelConfig
    inner_model = PaliGemmaModel

    def attention_groups(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None, token_type_ids: np.ndarray | None
    ) -> np.ndarray | None:
        """The prefix (image and prompt: ``token_type_ids`` 0, the default) is one bidirectional group;
        a suffix (1) and padding attend causally."""
        prefix = np.ones(input_ids.shape, dtype=bool) if token_type_ids is None else token_type_ids == 0
        if attention_mask is not None:
            prefix &= attention_mask != 0
        return np.where(prefix, 0, -1).astype(np.int32)
