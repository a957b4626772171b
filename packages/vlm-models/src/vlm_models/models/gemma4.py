"""Gemma 4 (``gemma4``): E2B / E4B (per-layer embeddings, KV sharing, an audio tower), 26B-A4B (experts beside
each dense MLP) and 31B (dense), on the decoder of nn/gemma4.py.

The vision tower takes images at their own aspect ratio as flat 16-pixel patches with (x, y) positions (padding
patches at (-1, -1)): learned per-axis position embeddings, ViT blocks with normed q/k/v and 2D RoPE, then each
``pooling_kernel_size``² patches are averaged into one soft token, scaled by sqrt(hidden). Soft tokens and the
audio tower's frames (nn/conformer.py) reach the decoder through an RMS norm and a projection
(``embed_vision`` / ``embed_audio``).

Module names follow the transformers 5 weights, which are the published layout (``model.language_model.*``,
``model.vision_tower.*``, ``model.audio_tower.*``, ``model.embed_vision.*``, ``model.embed_audio.*``);
``sanitize`` maps the MLX-community layout onto them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import KVCache, PromptEmbedding, RotatingKVCache
from vlm_runtime.attention import attention
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError, from_dict
from ..nn.checkpoint import rename_prefix
from ..nn.conformer import AudioEncoder, AudioEncoderConfig
from ..nn.gemma import SLIDING, GemmaGeneration
from ..nn.gemma4 import ClippableLinear, Gemma4Decoder, Gemma4DecoderConfig, Gemma4RMSNorm, rms_norm
from ..nn.layers import gated_activation
from ..nn.moe import expert_weights
from ..nn.output import ModelOutput
from ..nn.rope import Rotate, SplitAxialRotary
from ..nn.vision import features_per_image, image_groups, merge_features, vision_identity
from ..nn.vit import conv2d_weight_to_mlx

__all__ = ["Model", "ModelConfig", "VisionConfig"]


@dataclass(frozen=True)
class VisionConfig:
    # transformers' Gemma4VisionConfig defaults.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_hf(cls, vision: Mapping[str, Any]) -> VisionConfig:
        rope = vision.get("rope_parameters") or {}
        values = {k: v for k, v in vision.items() if v is not None}
        return from_dict(cls, values, rope_theta=float(rope.get("rope_theta", 100.0)))


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: Gemma4DecoderConfig
    vision: VisionConfig | None
    audio: AudioEncoderConfig | None
    image_token_id: int
    audio_token_id: int
    video_token_id: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text = config.get("text_config")
        if not isinstance(text, Mapping):
            raise ConfigError("a gemma4 config needs a text_config")
        vision, audio = config.get("vision_config"), config.get("audio_config")
        return cls(
            model_type=str(config.get("model_type")),
            text=Gemma4DecoderConfig.from_hf(text),
            vision=VisionConfig.from_hf(vision) if isinstance(vision, Mapping) else None,
            audio=AudioEncoderConfig.from_hf(audio) if isinstance(audio, Mapping) else None,
            image_token_id=int(config.get("image_token_id", 258_880)),
            audio_token_id=int(config.get("audio_token_id", 258_881)),
            video_token_id=int(config.get("video_token_id", 258_884)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        )


# ------------------------------------------------------------------------------------------------ vision tower


class PatchEmbedder(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.input_proj = nn.Linear(3 * c.patch_size**2, c.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, c.position_embedding_size, c.hidden_size))

    def __call__(self, pixel_values: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # The pixels arrive in [0, 1]; the tower wants [-1, 1].
        x = self.input_proj((2 * (pixel_values - 0.5)).astype(self.position_embedding_table.dtype))
        clamped = mx.maximum(positions, 0)
        table = self.position_embedding_table
        embedded = table[0][clamped[..., 0]] + table[1][clamped[..., 1]]
        return x + mx.where(padding[..., None], mx.array(0, embedded.dtype), embedded)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rms_norm_eps,
        )
        clip = c.use_clipped_linears
        self.q_proj = ClippableLinear(c.hidden_size, c.num_attention_heads * c.head_dim, clip)
        self.k_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, clip)
        self.v_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, clip)
        self.o_proj = ClippableLinear(c.num_attention_heads * c.head_dim, c.hidden_size, clip)
        self.q_norm = Gemma4RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(c.head_dim, c.rms_norm_eps)

    def __call__(self, x: mx.array, rotate: Rotate, mask: mx.array | None) -> mx.array:
        batch, length, _ = x.shape
        q = rotate(self.q_norm(self.q_proj(x).reshape(batch, length, self.heads, -1)).transpose(0, 2, 1, 3))
        k = rotate(self.k_norm(self.k_proj(x).reshape(batch, length, self.kv_heads, -1)).transpose(0, 2, 1, 3))
        v = rms_norm(self.v_proj(x).reshape(batch, length, self.kv_heads, -1), None, self.eps).transpose(0, 2, 1, 3)
        out = attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        clip = c.use_clipped_linears
        self.gate_proj = ClippableLinear(c.hidden_size, c.intermediate_size, clip)
        self.up_proj = ClippableLinear(c.hidden_size, c.intermediate_size, clip)
        self.down_proj = ClippableLinear(c.intermediate_size, c.hidden_size, clip)
        self._gated = gated_activation(c.hidden_activation)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._gated(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        self.input_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x: mx.array, rotate: Rotate, mask: mx.array | None) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotate, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.layers = [VisionLayer(c) for _ in range(c.num_hidden_layers)]


def soft_token_counts(image_position_ids: np.ndarray, pooling_kernel_size: int) -> list[int]:
    """How many soft tokens each image gives: its real patches over the pooling kernel's area."""
    real = (image_position_ids != -1).all(axis=-1).sum(axis=-1)
    return [int(n) // pooling_kernel_size**2 for n in real]


class VisionTower(nn.Module):
    """``vision_tower``: (images, patches, 3 * patch²) pixels in [0, 1] and their (images, patches, 2) positions
    -> each image's soft tokens (count, hidden)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))
        self._rotary = SplitAxialRotary(config.head_dim, config.rope_theta)

    @property
    def dtype(self) -> mx.Dtype:
        return self.patch_embedder.position_embedding_table.dtype  # read where no adapter wraps a weight

    def __call__(self, pixel_values: mx.array, image_position_ids: mx.array) -> list[mx.array]:
        c = self.config
        positions = image_position_ids.astype(mx.int32)
        padding = (positions == -1).all(axis=-1)
        x = self.patch_embedder(pixel_values, positions, padding)
        mask = None
        if bool(padding.any().item()):
            mask = mx.where(padding, mx.array(mx.finfo(x.dtype).min, x.dtype), mx.array(0, x.dtype))[:, None, None]
        rotate = self._rotary.at_grid(positions)
        for layer in self.encoder.layers:
            x = layer(x, rotate, mask)
        pooled = self._pool(mx.where(padding[..., None], mx.array(0, x.dtype), x), positions)
        pooled = pooled.astype(mx.float32) * c.hidden_size**0.5
        if c.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        pooled = pooled.astype(self.dtype)
        counts = soft_token_counts(np.asarray(image_position_ids), c.pooling_kernel_size)
        return [pooled[i, :n] for i, n in enumerate(counts)]

    def _pool(self, x: mx.array, positions: mx.array) -> mx.array:
        """Average each k x k block of patches into one token, blocks in row-major order of the image's grid (its
        own width); padding patches (zero here) count toward block 0 but add nothing."""
        k = self.config.pooling_kernel_size
        length = x.shape[1] // k**2
        if length == x.shape[1]:
            return x
        clamped = mx.maximum(positions, 0)
        width = clamped[..., 0].max(axis=-1, keepdims=True) + 1
        block = clamped[..., 0] // k + (width // k) * (clamped[..., 1] // k)
        weights = (block[..., None] == mx.arange(length)).astype(mx.float32) / k**2
        return (weights.swapaxes(1, 2) @ x.astype(mx.float32)).astype(x.dtype)


class MultimodalEmbedder(nn.Module):
    """RMS norm (no scale), then a projection into the decoder's width."""

    def __init__(self, width: int, text_width: int, eps: float) -> None:
        super().__init__()
        self.embedding_projection = nn.Linear(width, text_width, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm(x, None, self.eps))


class Gemma4Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        text = config.text.hidden_size
        self.language_model = Gemma4Decoder(config.text)
        if config.vision is not None:
            self.vision_tower = VisionTower(config.vision)
            self.embed_vision = MultimodalEmbedder(config.vision.hidden_size, text, config.vision.rms_norm_eps)
        if config.audio is not None:
            self.audio_tower = AudioEncoder(config.audio)
            self.embed_audio = MultimodalEmbedder(config.audio.output_proj_dims, text, config.audio.rms_norm_eps)


# ------------------------------------------------------------------------------------------------------- model


def takes_audio(config: Mapping[str, Any]) -> bool:
    """Only checkpoints with an audio tower hear (E2B, E4B)."""
    return isinstance(config.get("audio_config"), Mapping)


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """Image processor settings implied by the model config, for processor files that lack them."""
    vision = config.get("vision_config") or {}
    out: dict[str, Any] = {}
    for key in ("patch_size", "pooling_kernel_size"):
        if vision.get(key) is not None:
            out[key] = int(vision[key])
    return out


class Model(GemmaGeneration, nn.Module):
    """Gemma 4 for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the
    split steps. The decoder's input embeddings carry the per-layer inputs on their last axis (E2B / E4B), so
    ``embed_tokens`` and ``embed_prompt`` give everything ``hidden_states`` needs."""

    processor_defaults = staticmethod(processor_defaults)
    takes_audio = staticmethod(takes_audio)
    body: type[nn.Module] = Gemma4Model
    """The module tree under ``model.``: the decoder at ``language_model`` and, where the config has them, the
    ``embed_vision`` / ``embed_audio`` projections into it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.body(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    # -- runtime protocol
    def make_cache(self) -> list[Any]:
        window = self.config.text.sliding_window
        kinds = self.model.language_model.make_cache_kinds()
        return [RotatingKVCache(window) if kind == SLIDING else KVCache() for kind in kinds]

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return self._decoder_inputs(input_ids, None)

    def _text_ids(self, input_ids: mx.array) -> mx.array:
        """Media placeholders (which may lie past the embedding table) read as the padding token."""
        c = self.config
        is_media = (input_ids == c.image_token_id) | (input_ids == c.audio_token_id) | (input_ids == c.video_token_id)
        return mx.where(is_media, c.text.pad_token_id, input_ids)

    def _decoder_inputs(self, input_ids: mx.array, merge: Any) -> mx.array:
        decoder = self.model.language_model
        text_ids = self._text_ids(input_ids)
        embeds = decoder.embed(text_ids)
        if merge is not None:
            embeds = merge(embeds)
        return decoder.with_per_layer_inputs(text_ids, embeds)

    def image_features(self, pixel_values: mx.array, image_position_ids: mx.array) -> list[mx.array]:
        """Each image's soft tokens in the decoder's width."""
        return [self.model.embed_vision(t) for t in self.model.vision_tower(pixel_values, image_position_ids)]

    def audio_features(
        self, input_features: mx.array, input_features_mask: mx.array, cache: VisionFeatureCache | None = None
    ) -> mx.array:
        """(valid frames of all clips, text hidden): the audio tower's output for every clip's real frames. With a
        ``cache`` (the vision feature cache, which keeps clips too), clips heard before skip the tower: a clip is
        keyed by its real frames alone (the padding after them is zeros, whatever the batch's longest clip)."""
        if "embed_audio" not in self.model:
            raise ValueError("this checkpoint has no audio_config: it cannot take audio")
        masks = np.asarray(input_features_mask).astype(bool)
        tower = self.model.audio_tower

        def encode(order: list[int]) -> list[mx.array]:
            index = mx.array(order)
            frames, valid = tower(input_features[index], input_features_mask[index])
            keep = np.asarray(valid).astype(bool)
            return [self.model.embed_audio(frames[j][mx.array(np.flatnonzero(keep[j]))]) for j in range(len(order))]

        per_clip = features_per_image(
            cache,
            [("audio", input_features[i][mx.array(np.flatnonzero(m))], np.flatnonzero(m)) for i, m in enumerate(masks)],
            lambda: vision_identity(self, self.config.audio, tower.dtype, tower.subsample_conv_projection),
            encode,
        )
        return per_clip[0] if len(per_clip) == 1 else mx.concatenate(per_clip)

    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        """Token embeddings with image and audio features merged in (and the per-layer inputs appended), and the
        images' bidirectional groups where the checkpoint has them."""
        c = self.config

        def merge(embeds: mx.array) -> mx.array:
            if pixel_values is not None:
                if image_position_ids is None:
                    raise ValueError("gemma4 images need image_position_ids (the image processor gives them)")
                if "embed_vision" not in self.model:
                    raise ValueError("this checkpoint has no vision_config: it cannot take images")
                per_image = self._features_per_image(pixel_values, image_position_ids, vision_cache)
                embeds = merge_features(embeds, input_ids, c.image_token_id, mx.concatenate(per_image))
            if input_features is not None:
                if input_features_mask is None:
                    raise ValueError("gemma4 audio needs input_features_mask (the feature extractor gives it)")
                audio = self.audio_features(input_features, input_features_mask, vision_cache)
                embeds = merge_features(embeds, input_ids, c.audio_token_id, audio, kind="audio")
            return embeds

        inputs = self._decoder_inputs(input_ids, merge)
        groups = None
        if c.text.bidirectional_vision:
            if mm_token_type_ids is not None:
                types = np.asarray(mm_token_type_ids)
                groups = image_groups(np.where((types == 1) | (types == 2), 1, 0), 1)
            else:
                groups = image_groups(np.asarray(input_ids), [c.image_token_id, c.video_token_id])
        mask = None if attention_mask is None else np.asarray(attention_mask)
        padded = mask is not None and not bool(mask.all())
        return PromptEmbedding(
            inputs, None, attention_mask if padded else None, None if groups is None else mx.array(groups)
        )

    def _features_per_image(
        self, pixel_values: mx.array, image_position_ids: mx.array, vision_cache: VisionFeatureCache | None
    ) -> list[mx.array]:
        n_images = pixel_values.shape[0]

        def encode(indices: list[int]) -> list[mx.array]:
            if len(indices) == n_images:
                return self.image_features(pixel_values, image_position_ids)
            index = mx.array(indices)
            return self.image_features(pixel_values[index], image_position_ids[index])

        return features_per_image(
            vision_cache,
            [(pixel_values[i], image_position_ids[i]) for i in range(n_images)],
            self._vision_identity,
            encode,
        )

    def _vision_identity(self) -> str:
        tower = self.model.vision_tower
        return vision_identity(self, self.config.vision, tower.dtype, tower.patch_embedder.input_proj)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(
            input_ids,
            pixel_values,
            attention_mask,
            image_position_ids,
            input_features,
            input_features_mask,
            mm_token_type_ids,
        )
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
        c = self.config
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            key = rename_prefix(key, _PREFIXES).replace(".experts.switch_glu.", ".experts.")
            if not self._keeps(key):
                continue
            if key.endswith("layer0.conv.weight"):
                value = conv2d_weight_to_mlx(value, 1)
            elif key.endswith("layer1.conv.weight") and c.audio is not None:
                value = conv2d_weight_to_mlx(value, c.audio.subsampling_conv_channels[0])
            elif key.endswith("depthwise_conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
                value = value.swapaxes(1, 2)  # PyTorch (C, 1, K) -> MLX (C, K, 1)
            out[key] = value
        return expert_weights(out, hidden=c.text.hidden_size, intermediate=c.text.moe_intermediate_size)

    def _keeps(self, key: str) -> bool:
        """False for what transformers itself ignores or never stores: a tied head, the KV-shared layers' unused
        key/value weights, clamp bounds of unclipped vision linears, rotary tables, towers the config lacks."""
        c = self.config
        if key == "lm_head.weight" and c.tie_word_embeddings:
            return False
        if "rotary_emb" in key or key.endswith(("inv_timescales", ".softcap", "embed_scale")):
            return False
        if (c.audio is None and key.startswith(("model.audio_tower.", "model.embed_audio."))) or (
            c.vision is None and key.startswith(("model.vision_tower.", "model.embed_vision."))
        ):
            return False
        if key.startswith("model.vision_tower.") and key.endswith(_BOUNDS) and not c.vision.use_clipped_linears:
            return False
        if key.startswith("model.language_model.layers.") and ".self_attn." in key:
            layer = int(key.split(".")[3])
            unused = (".k_proj.", ".v_proj.", ".k_norm.", ".v_norm.")
            if c.text.shares_kv(layer) and any(part in key for part in unused):
                return False
        return True

    @staticmethod
    def keeps_float(path: str) -> str | None:
        """Layers ``vlm convert -q`` leaves float: the expert routers, whose few weights pick the experts (a
        coarse router picks others; mlx-vlm keeps them at 8 bits)."""
        return "an expert router (routing is kept exact)" if path.endswith(".router.proj") else None

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing checkpoints in the MLX-community layout (mlx-vlm's names)."""
        return {_mlx_community_name(key): value for key, value in weights.items()}


_BOUNDS = (".input_min", ".input_max", ".output_min", ".output_max")


_PREFIXES = (
    # (layout's prefix, ours); the first match wins, so the longer prefixes come first.
    ("model.", "model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("audio_tower.", "model.audio_tower."),
    ("embed_vision.", "model.embed_vision."),
    ("embed_audio.", "model.embed_audio."),
)


def _mlx_community_name(key: str) -> str:
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = key.replace(f".experts.{name}.", f".experts.switch_glu.{name}.")
    return rename_prefix(key, _MLX_COMMUNITY_PREFIXES)


_MLX_COMMUNITY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", ""),
)
