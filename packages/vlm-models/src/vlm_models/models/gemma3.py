"""Gemma 3: a SigLIP tower whose patch grid is average-pooled to a fixed number of soft tokens per image,
normed and projected into a Gemma 3 decoder (sliding-window and global layers, q/k norms). An image's soft
tokens attend to each other both ways during prefill.

Module names follow the transformers 5 weight names (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head``); ``sanitize`` maps the published and MLX-community layouts onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import KVCache, PromptEmbedding, RotatingKVCache
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, text_section
from ..nn.checkpoint import rename_prefix
from ..nn.gemma import GEMMA_DEFAULTS, SLIDING, GemmaDecoder, GemmaDecoderConfig, GemmaGeneration, GemmaRMSNorm
from ..nn.output import ModelOutput
from ..nn.siglip import SiglipVisionConfig, SiglipVisionModel
from ..nn.vision import features_per_image, image_groups, merge_features, vision_identity
from ..nn.vit import conv2d_weight_to_mlx

TEXT_DEFAULTS = {
    **GEMMA_DEFAULTS,  # and transformers' Gemma3TextConfig's own
    "vocab_size": 262_208,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: GemmaDecoderConfig
    vision: SiglipVisionConfig
    mm_tokens_per_image: int
    image_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = text_section(config)
        vision = SiglipVisionConfig.from_hf(config.get("vision_config") or {})
        tokens = int(config.get("mm_tokens_per_image") or 256)
        side = round(tokens**0.5)
        if side * side != tokens or vision.patches_per_side % side:
            raise ConfigError(
                f"mm_tokens_per_image={tokens} must be a square whose side divides the {vision.patches_per_side}"
                " patches per image side"
            )
        return cls(
            model_type=str(config.get("model_type")),
            text=GemmaDecoderConfig.from_hf(text, defaults=TEXT_DEFAULTS, qk_norm=True),
            vision=vision,
            mm_tokens_per_image=tokens,
            image_token_id=int(config.get("image_token_index", config.get("image_token_id", 262_144))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        )


class MultiModalProjector(nn.Module):
    """Average-pool the patch grid to ``tokens_per_side``², RMS-norm, project to the text width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        v = config.vision
        self.mm_input_projection_weight = mx.zeros((v.hidden_size, config.text.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.patches_per_side = v.patches_per_side
        self.pool = v.patches_per_side // round(config.mm_tokens_per_image**0.5)

    def __call__(self, patches: mx.array) -> mx.array:
        """(images, patches, vision hidden) -> (images, soft tokens, text hidden)."""
        n, _, dim = patches.shape
        side, k = self.patches_per_side, self.pool
        grid = patches.reshape(n, side // k, k, side // k, k, dim)
        pooled = grid.mean(axis=(2, 4)).reshape(n, -1, dim)
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight


class Gemma3Model(nn.Module):
    projector = MultiModalProjector

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionModel(config.vision)
        self.multi_modal_projector = self.projector(config)
        self.language_model = GemmaDecoder(config.text)


class Model(GemmaGeneration, nn.Module):
    """Gemma 3 for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the
    split steps (``embed_prompt``, ``hidden_states``, ``compute_logits``)."""

    config_class: Any = ModelConfig
    inner_model: Any = Gemma3Model

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = self.inner_model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(cls.config_class.from_hf(config))

    def attention_groups(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None, token_type_ids: np.ndarray | None
    ) -> np.ndarray | None:
        """Which prompt tokens attend to each other both ways: each image's soft tokens."""
        return image_groups(input_ids, self.config.image_token_id)

    # -- runtime protocol
    def make_cache(self) -> list[Any]:
        window = self.config.text.sliding_window
        return [RotatingKVCache(window) if kind == SLIDING else KVCache() for kind in self.config.text.layer_types]

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        # The image placeholder may lie past the embedding table; its rows are replaced by image features.
        vocab = self.config.text.vocab_size
        return self.model.language_model.embed(mx.where(input_ids >= vocab, 0, input_ids))

    def image_features(self, pixel_values: mx.array) -> mx.array:
        """(images, soft tokens, text hidden) for (images, C, H, W) pixels."""
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values))

    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        num_crops: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with the image features merged in, and the tokens' bidirectional groups.
        ``num_crops`` (a processor output) is implied by the pixels."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            features = mx.concatenate(self._features_per_image(pixel_values, vision_cache))
            embeds = merge_features(embeds, input_ids, self.config.image_token_id, features)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        types = None if token_type_ids is None else np.asarray(token_type_ids)
        groups = self.attention_groups(np.asarray(input_ids), mask, types)
        padded = mask is not None and not bool(mask.all())
        return PromptEmbedding(
            embeds,
            None,
            attention_mask if padded else None,
            None if groups is None else mx.array(groups),
        )

    def _features_per_image(self, pixel_values: mx.array, vision_cache: VisionFeatureCache | None) -> list[mx.array]:
        """(soft tokens, text hidden) per image."""
        tower = self.model.vision_tower
        n_images = pixel_values.shape[0]

        def encode(indices: list[int]) -> list[mx.array]:
            batch = pixel_values if len(indices) == n_images else pixel_values[mx.array(indices)]
            features = self.image_features(batch)
            return [features[j] for j in range(len(indices))]

        return features_per_image(
            vision_cache,
            [(pixel_values[i],) for i in range(n_images)],
            lambda: vision_identity(self, self.config.vision, tower.dtype, tower.embeddings.patch_embedding),
            encode,
        )

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        num_crops: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(input_ids, pixel_values, attention_mask, token_type_ids=token_type_ids)
        hidden = self.hidden_states(
            prompt.inputs_embeds,
            cache=cache,
            position_ids=position_ids,
            attention_mask=prompt.attention_mask,
            attention_groups=prompt.attention_groups,
        )
        return ModelOutput(logits=self.compute_logits(hidden))

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported checkpoint layout onto this module's names. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            key = canonical_name(key)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith("patch_embedding.weight"):
                value = conv2d_weight_to_mlx(value, self.config.vision.num_channels)
            out[key] = value
        return out

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing checkpoints in the MLX-community layout."""
        return {mlx_community_name(key): value for key, value in weights.items()}


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.language_model.", "model.language_model."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


_MLX_COMMUNITY_PREFIXES = (
    # Ours -> the MLX-community names: the published layout's.
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def canonical_name(key: str) -> str:
    return rename_prefix(key, _PREFIXES)


def mlx_community_name(key: str) -> str:
    return rename_prefix(key, _MLX_COMMUNITY_PREFIXES)
