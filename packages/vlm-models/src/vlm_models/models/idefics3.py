"""Idefics3: a SigLIP tower over each image tile (and a global view), its patch grid pixel-shuffled into fewer,
wider tokens and linearly projected, in front of a Llama decoder.

Module names follow the Hugging Face weight names, which transformers 4 and 5 share (``model.vision_model.*``,
``model.connector.modality_projection.proj``, ``model.text_model.*``, ``lm_head``); ``sanitize`` also maps the
MLX-community layout (``vision_model.*``, ``connector.*``, ``language_model.*``) onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import PromptEmbedding
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict
from ..nn.checkpoint import rename_prefix, renamed_weights
from ..nn.decoder import DecoderConfig, TextDecoder, TextGeneration, padded_prompt_embedding
from ..nn.output import ModelOutput
from ..nn.rope import Rotary
from ..nn.siglip import SiglipVisionConfig, SiglipVisionModel
from ..nn.vision import features_per_image, merge_features, vision_identity
from .llava import TEXT_DEFAULTS as LLAVA_TEXT_DEFAULTS

# Idefics3Config's own defaults: its Llama text model (rms_norm_eps 1e-5) and its SigLIP-like vision model.
TEXT_DEFAULTS = {**LLAVA_TEXT_DEFAULTS["llama"], "rms_norm_eps": 1e-5}
VISION_DEFAULTS = dict(
    hidden_size=1152,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=16,
    image_size=224,
    patch_size=32,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: DecoderConfig
    vision: SiglipVisionConfig
    rope_theta: float
    scale_factor: int
    image_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = dict(config.get("text_config") or {})
        if text.get("model_type", "llama") != "llama":
            raise ConfigError(f"text_config.model_type {text['model_type']!r} is not supported (Idefics3 uses llama)")
        text = {**TEXT_DEFAULTS, **text}
        text.setdefault("num_key_value_heads", text["num_attention_heads"])
        if text.get("mlp_bias"):
            raise ConfigError("text_config.mlp_bias is not supported (the Llama decoders here have none)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"text_config rope scaling {rope} is not supported (only the default rotary)")
        vision = SiglipVisionConfig.from_hf({**VISION_DEFAULTS, **(config.get("vision_config") or {})})
        scale = int(config.get("scale_factor", 2))
        if vision.patches_per_side % scale:
            raise ConfigError(
                f"scale_factor {scale} must divide the {vision.patches_per_side} patches per side of an image tile"
            )
        return cls(
            model_type=str(config.get("model_type")),
            text=from_dict(DecoderConfig, text),
            vision=vision,
            rope_theta=float(rope.get("rope_theta", text["rope_theta"])),
            scale_factor=scale,
            image_token_id=int(config.get("image_token_id", 128_257)),
            # The top-level value alone decides, as in transformers (a text-section value does not).
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def tokens_per_tile(self) -> int:
        return self.vision.patches_per_side**2 // self.scale_factor**2


def pixel_shuffle(x: mx.array, scale: int) -> mx.array:
    """(tiles, side*side, dim) -> (tiles, side*side / scale^2, dim * scale^2): each scale x scale block of the
    patch grid becomes one token, in the reference's order (columns grouped first, then rows)."""
    tiles, length, dim = x.shape
    side = round(length**0.5)
    x = x.reshape(tiles, side, side // scale, dim * scale).transpose(0, 2, 1, 3)
    x = x.reshape(tiles, side // scale, side // scale, dim * scale * scale).transpose(0, 2, 1, 3)
    return x.reshape(tiles, length // scale**2, dim * scale * scale)


class ModalityProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class Connector(nn.Module):
    """Pixel shuffle, then the linear projection to the text width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        in_dim = config.vision.hidden_size * config.scale_factor**2
        self.modality_projection = ModalityProjection(in_dim, config.text.hidden_size)

    def __call__(self, patches: mx.array) -> mx.array:
        return self.modality_projection(pixel_shuffle(patches, self.scale_factor))


class Idefics3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(config.vision)
        self.connector = Connector(config)
        self.text_model = TextDecoder(config.text, Rotary(config.text.attention_head_dim, config.rope_theta))

    @property
    def language_model(self) -> TextDecoder:
        """The name the shared decoder steps (``TextGeneration``) look for."""
        return self.text_model


def real_frames(pixel_values: np.ndarray) -> np.ndarray:
    """Which frames of (batch, frames, C, H, W) pixels hold an image: the processor pads a batch's shorter rows
    with all-zero frames, which the reference drops."""
    return (pixel_values != 0).any(axis=(2, 3, 4)).reshape(-1)


def patch_mask_of(pixel_mask: np.ndarray, patch_size: int) -> np.ndarray:
    """(frames, H, W) pixel masks -> (frames, H / p, W / p): a patch is real when any of its pixels is."""
    frames, height, width = pixel_mask.shape
    blocks = pixel_mask.reshape(frames, height // patch_size, patch_size, width // patch_size, patch_size)
    return blocks.any(axis=(2, 4))


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The tokens per tile implied by the model, for processor files that leave ``image_seq_len`` out."""
    return {"image_seq_len": ModelConfig.from_hf(config).tokens_per_tile}


class Model(TextGeneration, nn.Module):
    """Idefics3 for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the
    split steps (``embed_prompt``, ``hidden_states``, ``compute_logits``)."""

    config_class: Any = ModelConfig
    processor_defaults = staticmethod(processor_defaults)
    adapter_groups = {  # noqa: RUF012
        "language": ("model.text_model.",),
        "vision": ("model.vision_model.",),
        "projector": ("model.connector.",),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(cls.config_class.from_hf(config))

    # -- vision
    def tile_features(self, pixels: mx.array, patch_mask: np.ndarray) -> mx.array:
        """(frames, C, H, W) tiles and their (frames, rows, cols) patch masks -> (frames, tokens, text hidden)."""
        return self.model.connector(self.model.vision_model(pixels, patch_mask))

    def frames(self, pixel_values: mx.array, pixel_attention_mask: mx.array | None) -> tuple[mx.array, np.ndarray]:
        """The real frames of (batch, frames, C, H, W) pixels, in prompt order, and their patch masks."""
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (batch, frames, C, H, W), got {tuple(pixel_values.shape)}")
        flat = pixel_values.reshape(-1, *pixel_values.shape[2:])
        keep = np.flatnonzero(real_frames(np.asarray(pixel_values)))
        if pixel_attention_mask is None:
            pixel_mask = np.ones((len(keep), *flat.shape[2:]), dtype=bool)
        else:
            pixel_mask = np.asarray(pixel_attention_mask).reshape(-1, *flat.shape[2:])[keep].astype(bool)
        pixels = flat if len(keep) == flat.shape[0] else flat[mx.array(keep)]
        return pixels, patch_mask_of(pixel_mask, self.config.vision.patch_size)

    def image_features(
        self,
        pixel_values: mx.array,
        pixel_attention_mask: mx.array | None = None,
        vision_cache: VisionFeatureCache | None = None,
    ) -> mx.array:
        """(image tokens, text hidden): every real frame's tokens, in prompt order."""
        pixels, patch_mask = self.frames(pixel_values, pixel_attention_mask)
        tower = self.model.vision_model
        n_frames = pixels.shape[0]

        def encode(order: list[int]) -> list[mx.array]:
            every = len(order) == n_frames
            features = self.tile_features(pixels if every else pixels[mx.array(order)], patch_mask[order])
            return [features[j] for j in range(len(order))]

        return mx.concatenate(
            features_per_image(
                vision_cache,
                [(pixels[i], patch_mask[i]) for i in range(n_frames)],
                lambda: vision_identity(
                    self, (self.config.vision, self.config.scale_factor), tower.dtype, tower.embeddings.patch_embedding
                ),
                encode,
            )
        )

    # -- runtime protocol (the decoder steps come from TextGeneration)
    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        pixel_attention_mask: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with the tiles' features at the image tokens. Positions follow the cache unless the
        batch is padded; then each row counts only its real tokens, as transformers' generate does."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            features = self.image_features(pixel_values, pixel_attention_mask, vision_cache)
            embeds = merge_features(embeds, input_ids, self.config.image_token_id, features)
        return padded_prompt_embedding(embeds, attention_mask)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        pixel_attention_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(input_ids, pixel_values, attention_mask, pixel_attention_mask)
        return self.prompt_logits(prompt, cache, position_ids)

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported checkpoint layout onto this module's names. Pure and idempotent."""
        c = self.config
        return renamed_weights(weights, _PREFIXES, tied=c.tie_word_embeddings, num_channels=c.vision.num_channels)

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing checkpoints in the MLX-community layout."""
        return {rename_prefix(key, _MLX_COMMUNITY_PREFIXES): value for key, value in weights.items()}


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.", "model."),
    ("lm_head.", "lm_head."),
    ("vision_model.", "model.vision_model."),
    ("connector.", "model.connector."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.text_model."),
)
_MLX_COMMUNITY_PREFIXES = (
    ("model.text_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", ""),
)
