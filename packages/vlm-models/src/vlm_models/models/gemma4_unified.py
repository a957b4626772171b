"""The unified Gemma 4 (``gemma4_unified``): the Gemma 4 decoder (nn/gemma4.py; dense, no per-layer embeddings
or experts) with no vision or audio tower.

Each merged image patch (``(pooling_kernel_size * patch_size)``² * 3 raw pixels in [0, 1], from
processors/gemma4_unified.py) is one soft token: LayerNorm -> Linear -> LayerNorm, plus a factorised 2D position
embedding (a row of the table for x, another for y), LayerNorm, then the family's RMS norm and projection into the
decoder (``embed_vision``). Each audio frame (``audio_embed_dim`` raw samples) is one soft
token through an RMS norm and a projection (``embed_audio``). Image tokens attend both ways in every layer; the
sliding window bounds only the causal part.

Everything else (the decoder steps, the media merge, loading, ``sanitize``) is Gemma 4's (models/gemma4.py).
Module names follow the published weights, as transformers 5 saves them (``model.language_model.*``,
``model.vision_embedder.*``, ``model.embed_vision.embedding_projection``, ``model.embed_audio.*``); ``sanitize``
also takes the names transformers gives them in memory (``embed_vision.patch_ln1``, ...,
``embed_vision.multimodal_embedder.embedding_projection``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict
from ..nn.gemma4 import Gemma4Decoder, Gemma4DecoderConfig
from ..nn.layers import CenteredLayerNorm
from ..nn.vision import vision_identity
from . import gemma4
from .gemma4 import MultimodalEmbedder

__all__ = ["AudioConfig", "Model", "ModelConfig", "VisionConfig"]


@dataclass(frozen=True)
class VisionConfig:
    # transformers' Gemma4UnifiedVisionConfig defaults.
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def patch_pixels(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int = 640
    """Raw samples per frame (one soft token)."""
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: Gemma4DecoderConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    image_token_id: int
    audio_token_id: int
    video_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = config.get("text_config")
        if not isinstance(text, Mapping):
            raise ConfigError("a gemma4_unified config needs a text_config")
        bidirectional = text.get("use_bidirectional_attention", "vision")
        if bidirectional not in ("vision", None):
            raise ConfigError(f"use_bidirectional_attention={bidirectional!r} is not supported (only 'vision' or null)")
        # Unified decoders have neither per-layer embeddings nor experts, whatever Gemma 4's defaults say.
        decoder = Gemma4DecoderConfig.from_hf(
            {
                "sliding_window": 1024,
                **text,
                "use_bidirectional_attention": bidirectional,
                "hidden_size_per_layer_input": 0,
                "enable_moe_block": False,
            }
        )
        vision, audio = config.get("vision_config"), config.get("audio_config")
        vision_config = from_dict(VisionConfig, dict(vision)) if isinstance(vision, Mapping) else None
        if vision_config is not None and vision_config.output_proj_dims != vision_config.mm_embed_dim:
            raise ConfigError("vision_config.output_proj_dims must equal mm_embed_dim (the projection reads it)")
        return cls(
            model_type=str(config.get("model_type")),
            text=dataclasses.replace(decoder, vision_groups_every_layer=True),
            vision=vision_config,
            audio=from_dict(AudioConfig, dict(audio)) if isinstance(audio, Mapping) else None,
            image_token_id=int(config.get("image_token_id", 258_880)),
            audio_token_id=int(config.get("audio_token_id", 258_881)),
            video_token_id=int(config.get("video_token_id", 258_884)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        )


class VisionEmbedder(nn.Module):
    """``vision_embedder``: (images, patches, patch pixels) and their (images, patches, 2) positions -> (images,
    patches, mm_embed_dim); padding patches ((-1, -1)) get no position embedding and are dropped later."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        # Raw pixels: their spread may be far below their mean, which MLX's LayerNorm loses (CenteredLayerNorm).
        self.patch_ln1 = CenteredLayerNorm(c.patch_pixels)
        self.patch_dense = nn.Linear(c.patch_pixels, c.mm_embed_dim)
        self.patch_ln2 = CenteredLayerNorm(c.mm_embed_dim)
        self.pos_embedding = mx.zeros((c.mm_posemb_size, 2, c.mm_embed_dim))
        self.pos_norm = CenteredLayerNorm(c.mm_embed_dim)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.astype(self.pos_embedding.dtype))))
        clamped = mx.maximum(positions, 0)
        valid = (positions != -1)[..., None].astype(x.dtype)
        table = self.pos_embedding
        x = x + table[clamped[..., 0], 0] * valid[..., 0, :] + table[clamped[..., 1], 1] * valid[..., 1, :]
        return self.pos_norm(x)


class Gemma4UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        text = config.text.hidden_size
        self.language_model = Gemma4Decoder(config.text)
        if config.vision is not None:
            self.vision_embedder = VisionEmbedder(config.vision)
            self.embed_vision = MultimodalEmbedder(config.vision.output_proj_dims, text, config.vision.rms_norm_eps)
        if config.audio is not None:
            self.embed_audio = MultimodalEmbedder(config.audio.audio_embed_dim, text, config.audio.rms_norm_eps)


def _real_rows(positions: np.ndarray) -> list[np.ndarray]:
    """Per image, the indices of its real (not padding) patches."""
    return [np.flatnonzero(row) for row in (positions != -1).all(axis=-1)]


class Model(gemma4.Model):
    """The unified Gemma 4 for generation: Gemma 4's steps, with raw patches and waveform frames projected
    straight into the decoder. Gemma 4's ``processor_defaults`` (patch size, pooling) and ``takes_audio`` (an
    audio_config) hold as they are."""

    body = Gemma4UnifiedModel
    # LoRA: the patch projection stands in for a vision tower, the RMS-norm projections for the projector.
    adapter_groups: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "language": ("model.language_model.",),
            "vision": ("model.vision_embedder.",),
            "projector": ("model.embed_vision.", "model.embed_audio."),
        }
    )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    def image_features(self, pixel_values: mx.array, image_position_ids: mx.array) -> list[mx.array]:
        """Each image's soft tokens (its real patches) in the decoder's width."""
        patches = self.model.vision_embedder(pixel_values, image_position_ids.astype(mx.int32))
        embedded = self.model.embed_vision(patches)
        rows = _real_rows(np.asarray(image_position_ids))
        return [embedded[i][mx.array(r)] if len(r) < embedded.shape[1] else embedded[i] for i, r in enumerate(rows)]

    def _vision_identity(self) -> str:
        embedder = self.model.vision_embedder
        return vision_identity(self, self.config.vision, embedder.pos_embedding.dtype, embedder.patch_dense)

    def audio_features(
        self, input_features: mx.array, input_features_mask: mx.array, cache: VisionFeatureCache | None = None
    ) -> mx.array:
        """(valid frames of all clips, text hidden). No cache: one projection costs less than a lookup."""
        if "embed_audio" not in self.model:
            raise ValueError("this checkpoint has no audio_config: it cannot take audio")
        valid = np.flatnonzero(np.asarray(input_features_mask).astype(bool).reshape(-1))
        return self.model.embed_audio(input_features.reshape(-1, input_features.shape[-1])[mx.array(valid)])

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Gemma 4's, after mapping transformers' in-memory names onto the published ones. Pure and idempotent."""
        return super().sanitize({_published_name(key): value for key, value in weights.items()})

    def _keeps(self, key: str) -> bool:
        if self.config.vision is None and key.startswith("model.vision_embedder."):
            return False
        return super()._keeps(key)


_IN_MEMORY_NAMES = (
    # (transformers' module path, the published weight name)
    ("embed_vision.multimodal_embedder.embedding_projection.", "embed_vision.embedding_projection."),
    *((f"embed_vision.{name}", f"vision_embedder.{name}") for name in ("patch_", "pos_")),
)


def _published_name(key: str) -> str:
    if key.startswith("vision_embedder."):  # the MLX-community spelling, which drops ``model.``
        key = "model." + key
    for memory, published in _IN_MEMORY_NAMES:
        key = key.replace(memory, published)
    return key
