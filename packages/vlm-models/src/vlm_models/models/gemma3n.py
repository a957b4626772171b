"""Gemma 3n (``gemma3n``): E2B / E4B, text + images + audio in, text out.

The decoder keeps ``altup_num_inputs`` copies of the hidden state (AltUp): each layer predicts all of them from
a learned, token-routed mix, runs attention and MLP on the active one only, then corrects the others by the
active one's change. Beside attention a low-rank Laurel branch joins the residual; the first layers' MLPs keep
only the gate activations above mean + z * std of the token's gate (gaussian top-k, z the normal quantile of the
layer's sparsity); each layer adds its per-layer input (PLE) to the non-active copies; the last
``num_kv_shared_layers`` layers attend over the keys of the last earlier layer of their type. Attention is
Gemma 4's (normed q / k / v, scale 1; nn/gemma4.py), as are the per-layer inputs.

Images go through MobileNetV5 (nn/mobilenetv5.py) to ``msfa_output_resolution``² soft tokens; audio through the
USM conformer (nn/usm.py), each clip's frames padded to ``audio_soft_tokens_per_image`` with the embedding of the
last vocabulary id. Both reach the decoder through ``embed_vision`` / ``embed_audio``, which also embed the ids
of their own vocabularies (``vocab_offset`` up), such as the end-of-image and end-of-audio markers.

Module names follow the published weights (google/gemma-3n-E2B-it: ``model.language_model.*``,
``model.vision_tower.timm_model.*``, ``model.audio_tower.*``, ``model.embed_vision.*``, ``model.embed_audio.*``);
``sanitize`` also takes the MLX-community spelling (no ``model.`` in front of the towers and embedders).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_runtime import KVCache, PromptEmbedding, RotatingKVCache
from vlm_runtime.vision_cache import VisionFeatureCache

from ..config import ConfigError
from ..nn.checkpoint import rename_prefix
from ..nn.gemma import FULL, SLIDING, GemmaGeneration, decoder_mask, softcap
from ..nn.gemma4 import Gemma4Attention, Gemma4DecoderConfig, Gemma4RMSNorm, per_layer_inputs, rms_norm
from ..nn.layers import activation
from ..nn.mobilenetv5 import MobileNetV5, MobileNetV5Config
from ..nn.output import ModelOutput
from ..nn.rope import Rotary, Rotate
from ..nn.usm import USMAudioEncoder, USMConfig
from ..nn.vision import features_per_image, merge_features, vision_identity

__all__ = ["Model", "ModelConfig", "TextConfig"]

TEXT_DEFAULTS: dict[str, Any] = {
    # transformers' Gemma3nTextConfig defaults.
    "vocab_size": 262_400,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size": 2048,
    "hidden_size_per_layer_input": 256,
    "intermediate_size": 16_384,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "altup_active_idx": 0,
    "altup_correct_scale": True,
    "altup_num_inputs": 4,
    "num_kv_shared_layers": 15,
    "laurel_rank": 64,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class TextConfig:
    attention: Gemma4DecoderConfig
    """What the attention layers and caches read (sizes, layer types, KV sharing)."""
    intermediate_sizes: tuple[int, ...]
    activation_sparsity: tuple[float, ...]
    rope_theta: Mapping[str, float]
    vocab_size_per_layer_input: int
    hidden_size_per_layer_input: int
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    final_logit_softcapping: float | None = 30.0

    @classmethod
    def from_hf(cls, text: Mapping[str, Any]) -> TextConfig:
        text = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
        n = int(text["num_hidden_layers"])
        layer_types = tuple(text.get("layer_types") or [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)])
        if len(layer_types) != n or set(layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"layer_types must name {n} layers of {SLIDING!r}/{FULL!r}, got {layer_types}")
        widths = text["intermediate_size"]
        widths = tuple(int(w) for w in widths) if isinstance(widths, list | tuple) else (int(widths),) * n
        sparsity = text.get("activation_sparsity_pattern")
        if sparsity is None:
            sparsity = [0.95] * (10 if n > 10 else 0) + [0.0] * (n - (10 if n > 10 else 0))
        sparsity = tuple(float(s) for s in sparsity) if isinstance(sparsity, list | tuple) else (float(sparsity),) * n
        if len(widths) != n or len(sparsity) != n:
            raise ConfigError(f"intermediate_size and activation_sparsity_pattern need one value per layer ({n})")
        if any(not 0.0 <= s < 1.0 for s in sparsity):
            raise ConfigError(f"activation_sparsity_pattern values must lie in [0, 1), got {sparsity}")
        rope = text.get("rope_parameters") or {}
        theta = {
            FULL: float((rope.get(FULL) or {}).get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            SLIDING: float((rope.get(SLIDING) or {}).get("rope_theta", text.get("rope_local_base_freq", 10_000.0))),
        }
        for kind in (FULL, SLIDING):
            if (rope.get(kind) or {}).get("rope_type", "default") != "default":
                raise ConfigError(f"unsupported rope_type {rope[kind].get('rope_type')!r} for {kind} layers")
        shared = int(text.get("num_kv_shared_layers") or 0)
        if shared and set(layer_types[: n - shared]) != set(layer_types):
            raise ConfigError(f"num_kv_shared_layers={shared}: each layer type that shares keys needs an earlier one")
        heads, kv = int(text["num_attention_heads"]), int(text["num_key_value_heads"])
        attention = Gemma4DecoderConfig(
            hidden_size=int(text["hidden_size"]),
            num_hidden_layers=n,
            num_attention_heads=heads,
            intermediate_size=widths[0],
            vocab_size=int(text["vocab_size"]),
            layer_types=layer_types,
            head_dims=(int(text["head_dim"]),) * n,
            kv_heads=(kv,) * n,
            sliding_window=int(text["sliding_window"]),
            rope={},
            rms_norm_eps=float(text["rms_norm_eps"]),
            hidden_activation=str(text["hidden_activation"]),
            attention_bias=bool(text.get("attention_bias", False)),
            final_logit_softcapping=text.get("final_logit_softcapping"),
            num_kv_shared_layers=shared,
            hidden_size_per_layer_input=int(text["hidden_size_per_layer_input"]),
            vocab_size_per_layer_input=int(text["vocab_size_per_layer_input"]),
            pad_token_id=int(text.get("pad_token_id") or 0),
        )
        return cls(
            attention=attention,
            intermediate_sizes=widths,
            activation_sparsity=sparsity,
            rope_theta=theta,
            vocab_size_per_layer_input=int(text["vocab_size_per_layer_input"]),
            hidden_size_per_layer_input=int(text["hidden_size_per_layer_input"]),
            altup_num_inputs=int(text["altup_num_inputs"]),
            altup_active_idx=int(text["altup_active_idx"]),
            altup_correct_scale=bool(text["altup_correct_scale"]),
            laurel_rank=int(text["laurel_rank"]),
            final_logit_softcapping=text.get("final_logit_softcapping"),
        )

    @property
    def hidden_size(self) -> int:
        return self.attention.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.attention.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.attention.vocab_size

    @property
    def eps(self) -> float:
        return self.attention.rms_norm_eps


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: MobileNetV5Config
    audio: USMConfig
    image_token_id: int
    audio_token_id: int
    audio_soft_tokens_per_image: int
    vision_soft_tokens_per_image: int
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        text, vision, audio = (config.get(k) for k in ("text_config", "vision_config", "audio_config"))
        if not all(isinstance(c, Mapping) for c in (text, vision, audio)):
            raise ConfigError("a gemma3n config needs text_config, vision_config and audio_config")
        if config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)) is False:
            raise ConfigError("gemma3n ties its output head to the token embeddings; tie_word_embeddings=false")
        out = cls(
            model_type=str(config.get("model_type")),
            text=TextConfig.from_hf(text),
            vision=MobileNetV5Config.from_hf(vision),
            audio=USMConfig.from_hf(audio),
            image_token_id=int(config.get("image_token_id", 262_145)),
            audio_token_id=int(config.get("audio_token_id", 262_273)),
            audio_soft_tokens_per_image=int(config.get("audio_soft_tokens_per_image") or 188),
            vision_soft_tokens_per_image=int(config.get("vision_soft_tokens_per_image") or 256),
        )
        if out.vision.soft_tokens != out.vision_soft_tokens_per_image:
            raise ConfigError(
                f"vision_soft_tokens_per_image={out.vision_soft_tokens_per_image} but the vision tower gives "
                f"{out.vision.soft_tokens} (msfa_output_resolution {out.vision.msfa_output_resolution} squared)"
            )
        return out


# ------------------------------------------------------------------------------------------------------ decoder


class AltUp(nn.Module):
    """Alternating updates over ``altup_num_inputs`` copies of the hidden state (stacked on axis 0)."""

    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        n, width = c.altup_num_inputs, c.hidden_size
        self.correct_output_scale = mx.zeros((width,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(width, n, bias=False)
        self.router_norm = Gemma4RMSNorm(width, c.eps)
        self.n, self.active, self.width = n, c.altup_active_idx, width

    def _modalities(self, x: mx.array) -> mx.array:
        routed = self.modality_router(self.router_norm(x) * (1.0 / self.width))
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def predict(self, h: mx.array) -> mx.array:
        """Copy j becomes itself plus sum_i coef[j, i] * copy i, the coefficients routed by the active copy."""
        coefs = self.prediction_coefs(self._modalities(h[self.active]))  # (batch, length, n * n)
        coefs = coefs.reshape(*coefs.shape[:-1], self.n, self.n)  # [..., j, i]
        mixed = mx.einsum("blji,ibld->jbld", coefs, h)
        return (mixed + h).astype(h.dtype)

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        coefs = self.correction_coefs(self._modalities(activated)) + 1.0  # (batch, length, n)
        innovation = activated - predictions[self.active]
        return (innovation[None] * coefs.transpose(2, 0, 1)[..., None] + predictions).astype(activated.dtype)


class Laurel(nn.Module):
    """x + norm(right(left(x))): a low-rank learned residual."""

    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.linear_left = nn.Linear(c.hidden_size, c.laurel_rank, bias=False)
        self.linear_right = nn.Linear(c.laurel_rank, c.hidden_size, bias=False)
        self.post_laurel_norm = Gemma4RMSNorm(c.hidden_size, c.eps)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class SparseGatedMLP(nn.Module):
    """A gated MLP whose gate, in sparse layers, keeps only what exceeds mean + z * std over its width."""

    def __init__(self, c: TextConfig, layer: int) -> None:
        super().__init__()
        width = c.intermediate_sizes[layer]
        self.gate_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, c.hidden_size, bias=False)
        self._act = activation(c.attention.hidden_activation)
        sparsity = c.activation_sparsity[layer]
        # The normal quantile, rounded to float32 as transformers computes it.
        self.z = float(np.float32(statistics.NormalDist().inv_cdf(sparsity))) if sparsity > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        if self.z is not None:
            mean = gate.mean(axis=-1, keepdims=True)
            std = mx.sqrt(gate.var(axis=-1, keepdims=True))
            gate = nn.relu(gate - (mean + std * mx.array(self.z, gate.dtype)))
        return self.down_proj(self._act(gate) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer: int) -> None:
        super().__init__()
        self.kind = c.attention.layer_types[layer]
        eps, width = c.eps, c.hidden_size
        self.self_attn = Gemma4Attention(c.attention, layer)
        self.mlp = SparseGatedMLP(c, layer)
        self.input_layernorm = Gemma4RMSNorm(width, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(width, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(width, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(width, eps)
        self.altup = AltUp(c)
        self.laurel = Laurel(c)
        self.per_layer_input_gate = nn.Linear(width, c.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(c.hidden_size_per_layer_input, width, bias=False)
        self.post_per_layer_input_norm = Gemma4RMSNorm(width, eps)
        self._act = activation(c.attention.hidden_activation)
        self.active, self.correct_scale = c.altup_active_idx, c.altup_correct_scale

    def __call__(
        self,
        h: mx.array,
        rotate: Rotate,
        mask: Any,
        cache: Any,
        shared: dict[str, tuple[mx.array, mx.array]],
        per_layer_input: mx.array,
    ) -> mx.array:
        predictions = self.altup.predict(h)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        attended = self.post_attention_layernorm(self.self_attn(normed, rotate, mask, cache, shared))
        joined = (active + attended + self.laurel(normed)) * (2.0**-0.5)
        out = joined + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(joined)))
        corrected = self.altup.correct(predictions, out)
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale.astype(first.dtype)
        first = self.per_layer_projection(self._act(self.per_layer_input_gate(first)) * per_layer_input)
        first = self.post_per_layer_input_norm(first)
        # As transformers: every copy after the first takes the per-layer input (whichever copy is active).
        return mx.concatenate([corrected[:1], corrected[1:] + first[None]])


def _rescaled(x: mx.array, target: mx.array) -> mx.array:
    """``x`` scaled to the root-mean-square ``target`` (its own floored at sqrt(1e-5))."""
    magnitude = mx.sqrt(mx.maximum((x**2).mean(axis=-1, keepdims=True), 1e-5))
    return x * target / magnitude


class Gemma3nDecoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = c = config
        a = c.attention
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(c, i) for i in range(a.num_hidden_layers)]
        self.norm = Gemma4RMSNorm(a.hidden_size, a.rms_norm_eps)
        width = a.num_hidden_layers * c.hidden_size_per_layer_input
        self.embed_tokens_per_layer = nn.Embedding(c.vocab_size_per_layer_input, width)
        self.per_layer_model_projection = nn.Linear(a.hidden_size, width, bias=False)
        self.per_layer_projection_norm = Gemma4RMSNorm(c.hidden_size_per_layer_input, a.rms_norm_eps)
        self.altup_projections = [
            nn.Linear(a.hidden_size, a.hidden_size, bias=False) for _ in range(c.altup_num_inputs - 1)
        ]
        self.altup_unembed_projections = [
            nn.Linear(a.hidden_size, a.hidden_size, bias=False) for _ in range(c.altup_num_inputs - 1)
        ]
        self._rotary = {kind: Rotary(a.head_dims[0], c.rope_theta[kind]) for kind in set(a.layer_types)}

    def embed(self, input_ids: mx.array) -> mx.array:
        embeds = self.embed_tokens(input_ids)
        return embeds * mx.array(self.config.hidden_size**0.5, dtype=embeds.dtype)

    def with_per_layer_inputs(self, input_ids: mx.array, inputs_embeds: mx.array) -> mx.array:
        """``inputs_embeds`` with the per-layer inputs appended on the last axis; ids outside the per-layer table
        (the multimodal vocabularies) read row 0, as transformers'."""
        c = self.config
        ids = mx.where((input_ids >= 0) & (input_ids < c.vocab_size_per_layer_input), input_ids, 0)
        mixed = per_layer_inputs(self, ids, inputs_embeds, c.num_hidden_layers, c.hidden_size_per_layer_input)
        return mx.concatenate([inputs_embeds, mixed], axis=-1)

    def __call__(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> mx.array:
        c, a = self.config, self.config.attention
        h0 = inputs_embeds[..., : a.hidden_size]
        per_layer = inputs_embeds[..., a.hidden_size :].reshape(
            *h0.shape[:-1], a.num_hidden_layers, c.hidden_size_per_layer_input
        )
        length = h0.shape[1]
        offset = cache[0].offset if cache else 0
        start = offset + (cache[0].position_delta if cache else 0)
        rotate: dict[str, Rotate] = {}
        masks: dict[str, Any] = {}
        for kind, rotary in self._rotary.items():
            rotate[kind] = rotary.at_offset(start) if position_ids is None else rotary.at_positions(position_ids)
            layer_cache = cache[a.layer_types.index(kind)] if cache else None
            window = a.sliding_window if kind == SLIDING else None
            masks[kind] = decoder_mask(length, layer_cache, attention_mask, None, h0.dtype, window=window)
        target = mx.sqrt((h0**2).mean(axis=-1, keepdims=True))
        h = mx.stack([h0] + [_rescaled(p(h0), target) for p in self.altup_projections])
        shared: dict[str, tuple[mx.array, mx.array]] = {}
        for i, layer in enumerate(self.layers):
            layer_cache = cache[a.cache_index(i)] if cache else None
            h = layer(h, rotate[layer.kind], masks[layer.kind], layer_cache, shared, per_layer[:, :, i])
        target = mx.sqrt((h[0] ** 2).mean(axis=-1, keepdims=True))
        streams = [h[0]] + [_rescaled(p(h[i + 1]), target) for i, p in enumerate(self.altup_unembed_projections)]
        return self.norm(mx.stack(streams).mean(axis=0))

    def make_cache_kinds(self) -> list[str]:
        a = self.config.attention
        return list(a.layer_types[: a.first_shared_layer])

    def compute_logits(self, hidden: mx.array, lm_head: nn.Module | None = None) -> mx.array:
        return softcap(self.embed_tokens.as_linear(hidden), self.config.final_logit_softcapping)


# ------------------------------------------------------------------------------------------------ multimodal


class MultimodalEmbedder(nn.Module):
    """Soft tokens (a tower's output) or the ids of the tower's own vocabulary -> the decoder's width: RMS norm,
    projection, RMS norm without scale."""

    def __init__(self, width: int, vocab_size: int, vocab_offset: int, text_width: int, eps: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.hard_embedding_norm = Gemma4RMSNorm(width, eps)
        self.soft_embedding_norm = Gemma4RMSNorm(width, eps)
        self.embedding_projection = nn.Linear(width, text_width, bias=False)
        self.vocab_size, self.vocab_offset, self.eps = vocab_size, vocab_offset, eps

    def _out(self, x: mx.array) -> mx.array:
        return rms_norm(self.embedding_projection(x), None, self.eps)

    def soft(self, features: mx.array) -> mx.array:
        return self._out(self.soft_embedding_norm(features))

    def hard(self, input_ids: mx.array) -> mx.array:
        index = mx.clip(input_ids - self.vocab_offset, 0, self.vocab_size - 1)
        return self._out(self.hard_embedding_norm(self.embedding(index)))


class VisionTower(nn.Module):
    def __init__(self, config: MobileNetV5Config) -> None:
        super().__init__()
        self.timm_model = MobileNetV5(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.timm_model.conv_stem.bn.weight.dtype

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(images, 3, height, width) in [0, 1] -> (images, soft tokens, 2048)."""
        x = self.timm_model(pixel_values.transpose(0, 2, 3, 1).astype(self.dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Gemma3nModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        text = config.text
        self.language_model = Gemma3nDecoder(text)
        self.vision_tower = VisionTower(config.vision)
        self.audio_tower = USMAudioEncoder(config.audio)
        v, a = config.vision, config.audio
        self.embed_vision = MultimodalEmbedder(
            v.hidden_size, v.vocab_size, v.vocab_offset, text.hidden_size, v.rms_norm_eps
        )
        self.embed_audio = MultimodalEmbedder(
            a.hidden_size, a.vocab_size, a.vocab_offset, text.hidden_size, a.rms_norm_eps
        )


# ------------------------------------------------------------------------------------------------------- model


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image processor's token count implied by the model config, for processor files that lack it."""
    tokens = config.get("vision_soft_tokens_per_image")
    return {} if tokens is None else {"image_seq_length": int(tokens)}


class Model(GemmaGeneration, nn.Module):
    """Gemma 3n for generation. ``__call__`` takes the Hugging Face processor's tensors; the runtime uses the
    split steps. The decoder's input embeddings carry the per-layer inputs on their last axis."""

    processor_defaults = staticmethod(processor_defaults)
    # LoRA: the vision tower's adaptable layers are its 1x1 convolutions; the embedders are the projector.
    adapter_groups: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "language": ("model.language_model.",),
            "vision": ("model.vision_tower.",),
            "projector": ("model.embed_vision.", "model.embed_audio."),
        }
    )

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3nModel(config)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    # -- runtime protocol
    def make_cache(self) -> list[Any]:
        window = self.config.text.attention.sliding_window
        kinds = self.model.language_model.make_cache_kinds()
        return [RotatingKVCache(window) if kind == SLIDING else KVCache() for kind in kinds]

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return self._decoder_inputs(input_ids, None)

    def _token_embeddings(self, input_ids: mx.array) -> mx.array:
        """Text ids through the scaled token table; ids of the vision and audio vocabularies through their
        embedders."""
        m = self.model
        vision_start, audio_start = m.embed_vision.vocab_offset, m.embed_audio.vocab_offset
        embeds = m.language_model.embed(mx.minimum(input_ids, self.config.text.vocab_size - 1))
        is_vision = (input_ids >= vision_start) & (input_ids < audio_start)
        is_audio = input_ids >= audio_start
        embeds = mx.where(is_vision[..., None], m.embed_vision.hard(input_ids).astype(embeds.dtype), embeds)
        return mx.where(is_audio[..., None], m.embed_audio.hard(input_ids).astype(embeds.dtype), embeds)

    def _decoder_inputs(self, input_ids: mx.array, merge: Any) -> mx.array:
        embeds = self._token_embeddings(input_ids)
        if merge is not None:
            embeds = merge(embeds)
        return self.model.language_model.with_per_layer_inputs(input_ids, embeds)

    def image_features(self, pixel_values: mx.array) -> list[mx.array]:
        """Each image's soft tokens in the decoder's width."""
        tokens = self.model.vision_tower(pixel_values)
        tokens = tokens * mx.array(self.config.vision.hidden_size**0.5, tokens.dtype)
        return list(self.model.embed_vision.soft(tokens))

    def audio_features(self, input_features: mx.array, input_features_mask: mx.array) -> mx.array:
        """(clips * audio_soft_tokens_per_image, text hidden): every clip's frames, its padding frames and the
        rest of its fixed-length slot filled with the embedding of the last vocabulary id."""
        c = self.config
        frames, valid = self.model.audio_tower(input_features, input_features_mask)
        soft = self.model.embed_audio.soft(frames)
        padding = self.model.embed_audio.hard(mx.array([c.text.vocab_size - 1])).astype(soft.dtype)
        clips, length, width = soft.shape
        slots = c.audio_soft_tokens_per_image
        if length > slots:
            raise ValueError(
                f"an audio clip gives {length} frames but the model takes {slots} per clip: cut the audio shorter"
            )
        soft = mx.where(valid[..., None], soft, padding)
        soft = mx.concatenate([soft, mx.broadcast_to(padding, (clips, slots - length, width))], axis=1)
        return soft.reshape(-1, width)

    def embed_prompt(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        *,
        vision_cache: VisionFeatureCache | None = None,
    ) -> PromptEmbedding:
        c = self.config

        def merge(embeds: mx.array) -> mx.array:
            if pixel_values is not None:
                per_image = self._features_per_image(pixel_values, vision_cache)
                embeds = merge_features(embeds, input_ids, c.image_token_id, mx.concatenate(per_image))
            if input_features is not None:
                if input_features_mask is None:
                    raise ValueError("gemma3n audio needs input_features_mask (the feature extractor gives it)")
                audio = self.audio_features(input_features, input_features_mask)
                embeds = merge_features(embeds, input_ids, c.audio_token_id, audio, kind="audio")
            return embeds

        inputs = self._decoder_inputs(input_ids, merge)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        padded = mask is not None and not bool(mask.all())
        return PromptEmbedding(inputs, None, attention_mask if padded else None, None)

    def _features_per_image(self, pixel_values: mx.array, vision_cache: VisionFeatureCache | None) -> list[mx.array]:
        def encode(indices: list[int]) -> list[mx.array]:
            if len(indices) == pixel_values.shape[0]:
                return self.image_features(pixel_values)
            return self.image_features(pixel_values[mx.array(indices)])

        tower = self.model.vision_tower

        def identity() -> str:
            return vision_identity(self, self.config.vision, tower.dtype, tower.timm_model.conv_stem.conv)

        contents = [(pixel_values[i],) for i in range(pixel_values.shape[0])]
        return features_per_image(vision_cache, contents, identity, encode)

    # -- the Hugging Face contract
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        attention_mask: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
    ) -> ModelOutput:
        prompt = self.embed_prompt(input_ids, pixel_values, attention_mask, input_features, input_features_mask)
        hidden = self.hidden_states(
            prompt.inputs_embeds, cache=cache, position_ids=position_ids, attention_mask=prompt.attention_mask
        )
        return ModelOutput(logits=self.compute_logits(hidden))

    # -- loading
    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Map the published layout (and the MLX-community one) onto this module's names, convolutions in MLX's
        channels-last layout. Pure and idempotent."""
        renamed = {rename_prefix(key, _PREFIXES): value for key, value in weights.items()}
        torch_layout = _torch_conv_layout(renamed)
        out: dict[str, mx.array] = {}
        for key, value in renamed.items():
            if not self._keeps(key):
                continue
            if value.ndim == 4 and key.endswith(".weight") and _is_conv(key):
                pointwise = value.shape[2:] == (1, 1) or value.shape[1:3] == (1, 1)
                # A 1x1 convolution is a linear layer here: (out, in, 1, 1) or (out, 1, 1, in) -> (out, in).
                value = value.reshape(value.shape[0], -1) if pointwise else _conv2d_to_mlx(value, torch_layout)
            elif key.endswith("depthwise_conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
                value = value.swapaxes(1, 2)  # PyTorch (C, 1, K) -> MLX (C, K, 1)
            out[key] = value
        return out

    def _keeps(self, key: str) -> bool:
        """False for what transformers itself ignores: a tied head, the KV-shared layers' unused key/value
        weights, and the constants it recomputes (rotary and timing tables, scales, masks), should a checkpoint
        hold them."""
        if key == "lm_head.weight" or key.endswith(_CONSTANTS):
            return False
        if key.startswith("model.language_model.layers.") and ".self_attn." in key:
            layer = int(key.split(".")[3])
            unused = (".k_proj.", ".v_proj.", ".k_norm.", ".v_norm.")
            if self.config.text.attention.shares_kv(layer) and any(part in key for part in unused):
                return False
        return True

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize`` for writing the MLX-community layout (mlx-vlm's names; its 1x1 convolutions
        are (out, 1, 1, in) convolution weights)."""
        out = {}
        for key, value in weights.items():
            pointwise = key.startswith("model.vision_tower.") and key.endswith(".weight") and value.ndim == 2
            if pointwise and mx.issubdtype(value.dtype, mx.floating):
                value = value.reshape(value.shape[0], 1, 1, value.shape[1])
            out[rename_prefix(key, _MLX_COMMUNITY_PREFIXES)] = value
        return out


_CONSTANTS = (
    "inv_timescales",
    "inv_freq",
    ".q_scale",
    ".softcap",
    ".local_causal_valid_mask",
    ".gradient_clipping",
    ".router_input_scale",
    ".per_layer_projection_scale",
    ".per_layer_input_scale",
    ".embed_scale",
)
_PREFIXES = (
    ("model.", "model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("audio_tower.", "model.audio_tower."),
    ("embed_vision.", "model.embed_vision."),
    ("embed_audio.", "model.embed_audio."),
)
_MLX_COMMUNITY_PREFIXES = (("model.language_model.", "language_model.model."), ("model.", ""))


def _is_conv(key: str) -> bool:
    return key.startswith("model.vision_tower.") or ".subsample_conv_projection." in key


def _torch_conv_layout(weights: Mapping[str, mx.array]) -> bool:
    """Whether the checkpoint's 2-D convolutions are in PyTorch's (out, in, kh, kw) layout: decided by the ones
    whose shape tells (a square kernel last and another channel count second); a 3x3 conv over 3 channels, as
    the stem's, reads the same either way."""
    verdicts = {
        value.shape[2] == value.shape[3] and value.shape[1] != value.shape[3]
        for key, value in weights.items()
        if value.ndim == 4 and _is_conv(key) and not (value.shape[1] == value.shape[2] == value.shape[3])
    }
    if len(verdicts) > 1:
        raise ValueError("the checkpoint mixes PyTorch and MLX convolution layouts")
    return verdicts == {True}


def _conv2d_to_mlx(weight: mx.array, torch_layout: bool) -> mx.array:
    return weight.transpose(0, 2, 3, 1) if torch_layout else weight
