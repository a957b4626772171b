"""LLaVA 1.5: a CLIP vision tower read at a chosen layer, a two-layer MLP projector, and a Llama decoder.

Module names follow the transformers 5 weight names (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head``); ``sanitize`` maps the published (transformers 4) and MLX-community
layouts onto them.
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
from ..nn.clip import CLIPVisionConfig, CLIPVisionTower
from ..nn.decoder import DecoderConfig, TextDecoder, TextGeneration
from ..nn.layers import activation
from ..nn.output import ModelOutput
from ..nn.rope import Rotary
from ..nn.vision import features_per_image, merge_features, vision_identity
from ..nn.vit import conv2d_weight_to_mlx

# transformers' defaults for the text models LLaVA checkpoints use: published configs leave out what equals them.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        sliding_window=None,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        sliding_window=4096,
    ),
}
# LlavaConfig's own defaults for its vision tower (CLIP ViT-L/14 at 336 px).
VISION_DEFAULTS = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: DecoderConfig
    vision: Any
    """The tower's config: CLIPVisionConfig here, PixtralVisionConfig for the Pixtral variant."""
    rope_theta: float
    image_token_id: int
    vision_feature_layers: tuple[int, ...]
    vision_feature_select_strategy: str
    projector_hidden_act: str
    projector_bias: bool
    tie_word_embeddings: bool
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], vision: Any = None) -> ModelConfig:
        """``vision``: the tower's config, parsed by the caller, for towers other than CLIP."""
        vision_type = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if vision is None and vision_type != "clip_vision_model":
            raise ConfigError(f"vision_config.model_type {vision_type!r} is not a CLIP tower")
        text = dict(config.get("text_config") or {})
        text_type = text.get("model_type", "llama")
        if text_type not in TEXT_DEFAULTS:
            raise ConfigError(f"text_config.model_type {text_type!r} is not supported (known: {sorted(TEXT_DEFAULTS)})")
        text = {**TEXT_DEFAULTS[text_type], **text}
        text.setdefault("num_key_value_heads", text["num_attention_heads"])
        if text["sliding_window"] is not None:
            raise ConfigError("text_config.sliding_window is set: sliding-window attention is not supported yet")
        if text.get("attention_bias") or text.get("mlp_bias"):
            raise ConfigError("text_config attention_bias / mlp_bias are not supported (LLaVA's decoders have none)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"text_config rope type {rope_type!r} is not supported (only the default rotary)")
        layers = config.get("vision_feature_layer", -2)
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        try:
            return cls(
                model_type=config["model_type"],
                text=from_dict(DecoderConfig, text),
                vision=vision
                or from_dict(CLIPVisionConfig, {**VISION_DEFAULTS, **(config.get("vision_config") or {})}),
                rope_theta=float(rope.get("rope_theta", text["rope_theta"])),
                image_token_id=int(config.get("image_token_id", config.get("image_token_index", 32000))),
                vision_feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),),
                vision_feature_select_strategy=strategy,
                projector_hidden_act=config.get("projector_hidden_act", "gelu"),
                projector_bias=bool(config.get("multimodal_projector_bias", True)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings", False)),
                image_grid_pinpoints=tuple(tuple(int(v) for v in p) for p in config.get("image_grid_pinpoints") or ()),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json lacks {exc.args[0]!r}") from None


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The placeholder-count settings implied by the model, for checkpoints saved before processor_config.json
    carried them (the model then expanded ``<image>`` itself): one token per patch, plus CLIP's class token unless
    the strategy drops it."""
    vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
    return {
        "patch_size": vision["patch_size"],
        "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "default"),
        "num_additional_image_tokens": 1,
    }


class MultiModalProjector(nn.Module):
    """linear_2(act(linear_1(x))): vision features (of all selected layers) to the text width."""

    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self._act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self._act(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, vision_tower: nn.Module | None = None, projector: nn.Module | None = None
    ) -> None:
        """``vision_tower`` / ``projector``: variants' own (default: CLIP and the two-layer MLP)."""
        super().__init__()
        self.vision_tower = vision_tower or CLIPVisionTower(config.vision)
        in_dim = config.vision.hidden_size * len(config.vision_feature_layers)
        self.multi_modal_projector = projector or MultiModalProjector(
            in_dim, config.text.hidden_size, config.projector_hidden_act, config.projector_bias
        )
        self.language_model = TextDecoder(config.text, Rotary(config.text.attention_head_dim, config.rope_theta))


class Model(TextGeneration, nn.Module):
    """LLaVA for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the split
    steps (``embed_prompt``, ``hidden_states``, ``compute_logits``)."""

    image_input_names: tuple[str, ...] = ()
    """Inputs besides ``pixel_values`` that the image features depend on (LLaVA-NeXT: ``image_sizes``)."""
    processor_defaults = staticmethod(processor_defaults)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.make_inner(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @staticmethod
    def make_inner(config: ModelConfig) -> nn.Module:
        return LlavaModel(config)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    # -- vision
    def tile_features(self, pixel_values: mx.array) -> mx.array:
        """(tiles, C, H, W) pixels -> (tiles, tokens, text hidden) projected features."""
        c = self.config
        hidden = self.model.vision_tower(pixel_values, c.vision_feature_layers)
        if c.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # the class token
        return self.model.multi_modal_projector(hidden)

    def image_features(self, pixel_values: mx.array, **image_inputs: mx.array) -> list[mx.array]:
        """One (tokens, hidden) array per image, in prompt order."""
        features = self.tile_features(pixel_values)
        return [features[i] for i in range(features.shape[0])]

    def image_pixels(self, pixel_values: mx.array, **image_inputs: mx.array) -> list[mx.array]:
        """Each image's own pixels, shaped so that concatenating any of them is a valid ``pixel_values``."""
        return [pixel_values[i : i + 1] for i in range(pixel_values.shape[0])]

    def batch_pixels(self, pixels: list[mx.array]) -> mx.array:
        """``pixel_values`` for a list of ``image_pixels`` entries."""
        return mx.concatenate(pixels)

    @property
    def patch_embedding(self) -> nn.Module:
        """The tower's first layer: its weights tell checkpoints apart in the vision feature cache."""
        return self.model.vision_tower.embeddings.patch_embedding

    def _features_per_image(
        self, pixel_values: mx.array, vision_cache: VisionFeatureCache | None, **image_inputs: mx.array
    ) -> list[mx.array]:
        """Per image: its features, from ``vision_cache`` where it has them, the rest from one tower call."""
        if vision_cache is None:  # the pixels as the processor batched them: no need to split them per image
            return self.image_features(pixel_values, **image_inputs)
        pixels = self.image_pixels(pixel_values, **image_inputs)
        extras = {k: np.asarray(v) for k, v in image_inputs.items()}

        def encode(order: list[int]) -> list[mx.array]:
            index = mx.array(order)
            batch = self.batch_pixels([pixels[i] for i in order])
            return self.image_features(batch, **{k: v[index] for k, v in image_inputs.items()})

        return features_per_image(
            vision_cache,
            [(p, *(v[i] for v in extras.values())) for i, p in enumerate(pixels)],
            lambda: vision_identity(self, self.config, self.model.vision_tower.dtype, self.patch_embedding),
            encode,
        )

    # -- runtime protocol (the decoder steps come from TextGeneration)
    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
        **image_inputs: mx.array,
    ) -> PromptEmbedding:
        """Token embeddings with the image features merged in. Positions follow the cache unless the batch is
        padded; then each row counts only its real tokens, as transformers' generate does."""
        unknown = set(image_inputs) - set(self.image_input_names)
        if unknown:
            raise ValueError(f"{self.config.model_type}: unexpected inputs {sorted(unknown)}")
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            per_image = self._features_per_image(pixel_values, vision_cache, **image_inputs)
            features = per_image[0] if len(per_image) == 1 else mx.concatenate(per_image)
            embeds = merge_features(embeds, input_ids, self.config.image_token_id, features)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        if mask is None or mask.all():
            return PromptEmbedding(embeds)
        positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
        return PromptEmbedding(embeds, mx.array(positions), attention_mask)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        **image_inputs: mx.array,
    ) -> ModelOutput:
        prompt = self.embed_prompt(input_ids, pixel_values, attention_mask, **image_inputs)
        return self.prompt_logits(prompt, cache, position_ids)

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported checkpoint layout onto this module's names. Pure and idempotent."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.endswith("embeddings.position_ids"):
                continue  # a buffer some older checkpoints saved
            key = rename_prefix(key, _PREFIXES)
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if key.endswith(("patch_embedding.weight", "patch_conv.weight")):
                value = conv2d_weight_to_mlx(value, self.config.vision.num_channels)
            out[key] = value
        return out

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing checkpoints in the MLX-community layout (the published names,
        with MLX's channels-last convolution weights, which ``sanitize`` already holds)."""
        return {rename_prefix(key, _MLX_COMMUNITY_PREFIXES): value for key, value in weights.items()}


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.vision_tower.vision_model.", "model.vision_tower."),  # transformers 4.52-4.57
    ("model.", "model."),
    ("lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),  # Pixtral towers, not nested in the published layout
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
_MLX_COMMUNITY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.", ""),
)


def rename_prefix(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for prefix, replacement in table:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key
