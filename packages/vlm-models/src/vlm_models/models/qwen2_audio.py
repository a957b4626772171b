"""Qwen2-Audio (``qwen2_audio``): Whisper's encoder (nn/whisper.py) pooled to one feature per 40 ms, a linear
projector, and a Qwen2 decoder (plain RoPE, q/k/v biases). Each clip's real frames replace its run of
``<|AUDIO|>`` tokens.

Module names follow the transformers 5 weight names (``model.audio_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head``); ``sanitize`` maps the published (transformers 4) and MLX-community
layouts onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import PromptEmbedding
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict
from ..nn.checkpoint import rename_prefix
from ..nn.decoder import DecoderConfig, TextDecoder, TextGeneration, padded_prompt_embedding
from ..nn.output import ModelOutput
from ..nn.rope import Rotary
from ..nn.vision import features_per_image, merge_features, vision_identity
from ..nn.whisper import WhisperEncoder, WhisperEncoderConfig, conv1d_weight_to_mlx, encoder_lengths

# Qwen2Config's defaults: the published configs leave out what equals them.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: DecoderConfig
    audio: WhisperEncoderConfig
    rope_theta: float
    audio_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = {**TEXT_DEFAULTS, **(config.get("text_config") or {})}
        text.setdefault("num_key_value_heads", text["num_attention_heads"])
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"text_config rope type {rope_type!r} is not supported (only the default rotary)")
        if text.get("use_sliding_window"):
            raise ConfigError("text_config.use_sliding_window is set: sliding-window attention is not supported yet")
        return cls(
            model_type=config.get("model_type", "qwen2_audio"),
            # Qwen2 puts biases on q/k/v only.
            text=from_dict(DecoderConfig, text, attention_bias=True),
            audio=WhisperEncoderConfig.from_hf(config.get("audio_config") or {}),
            rope_theta=float(rope.get("rope_theta", text["rope_theta"])),
            audio_token_id=int(config.get("audio_token_id", config.get("audio_token_index", 151646))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text["tie_word_embeddings"])),
        )


class MultiModalProjector(nn.Module):
    def __init__(self, audio_width: int, text_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(audio_width, text_width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class Qwen2AudioModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.audio_tower = WhisperEncoder(config.audio)
        self.multi_modal_projector = MultiModalProjector(config.audio.d_model, config.text.hidden_size)
        self.language_model = TextDecoder(config.text, Rotary(config.text.attention_head_dim, config.rope_theta))


class Model(TextGeneration, nn.Module):
    """Qwen2-Audio for generation. ``__call__`` takes the Hugging Face processor's tensors (``input_features``
    and ``feature_attention_mask`` for the clips); the runtime uses the split steps."""

    adapter_groups: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "language": ("model.language_model.",),
            "vision": ("model.audio_tower.",),  # the media tower LoRA's "vision" group adapts
            "projector": ("model.multi_modal_projector.",),
        }
    )

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2AudioModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    # -- audio
    def clip_features(self, input_features: mx.array, frames: mx.array) -> list[mx.array]:
        """One (tokens, text hidden) array per clip: the projected encoder outputs of its real audio."""
        encoded = self.model.multi_modal_projector(self.model.audio_tower(input_features, frames))
        _, outputs = encoder_lengths(frames)
        return [encoded[i, :n] for i, n in enumerate(np.asarray(outputs).tolist())]

    def audio_features(
        self, input_features: mx.array, feature_attention_mask: mx.array, cache: VisionFeatureCache | None
    ) -> mx.array:
        """All clips' features in prompt order; with a ``cache`` (the vision feature cache, which keeps clips
        too), clips heard before skip the tower and one tower call computes the rest."""
        frames = mx.array(np.asarray(feature_attention_mask).sum(axis=-1).astype(np.int32))
        tower = self.model.audio_tower
        per_clip = features_per_image(
            cache,
            [("audio", input_features[i], int(frames[i].item())) for i in range(input_features.shape[0])],
            lambda: vision_identity(self, self.config.audio, tower.dtype, tower.conv1),
            lambda order: self.clip_features(input_features[mx.array(order)], frames[mx.array(order)]),
        )
        return per_clip[0] if len(per_clip) == 1 else mx.concatenate(per_clip)

    # -- runtime protocol (the decoder steps come from TextGeneration)
    def embed_prompt(
        self,
        input_ids: mx.array,
        input_features: mx.array | None = None,
        feature_attention_mask: mx.array | None = None,
        attention_mask: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with the clips' features at their ``<|AUDIO|>`` tokens. Positions follow the cache
        unless the batch is padded; then each row counts only its real tokens."""
        embeds = self.embed_tokens(input_ids)
        if input_features is not None:
            if feature_attention_mask is None:
                raise ValueError(
                    "qwen2_audio needs feature_attention_mask with input_features (the processor gives it)"
                )
            features = self.audio_features(input_features, feature_attention_mask, vision_cache)
            embeds = merge_features(embeds, input_ids, self.config.audio_token_id, features, kind="audio")
        return padded_prompt_embedding(embeds, attention_mask)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        input_features: mx.array | None = None,
        feature_attention_mask: mx.array | None = None,
        attention_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(input_ids, input_features, feature_attention_mask, attention_mask)
        return self.prompt_logits(prompt, cache, position_ids)

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported checkpoint layout onto this module's names. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        c = self.config.audio
        for key, value in weights.items():
            key = rename_prefix(key, _PREFIXES)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith("audio_tower.conv1.weight"):
                value = conv1d_weight_to_mlx(value, c.num_mel_bins)
            elif key.endswith("audio_tower.conv2.weight"):
                value = conv1d_weight_to_mlx(value, c.d_model)
            out[key] = value
        return out

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize``: the published names, with MLX's channels-last convolution weights."""
        return {rename_prefix(key, _MLX_COMMUNITY_PREFIXES): value for key, value in weights.items()}


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.", "model."),
    ("lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("audio_tower.", "model.audio_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
_MLX_COMMUNITY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", ""),
)
