"""The Gemma 4 text decoder (``gemma4_text``; the unified Gemma 4 checkpoints use it too).

What changed from Gemma 3: RMSNorms scale by their weight (not 1 + w) and values are normed too; queries and
keys are normed instead of scaled (attention scale 1); global layers have their own head size (and, with
``attention_k_eq_v``, their own KV head count and keys reused as values) and "proportional" RoPE that turns only
the first quarter of the frequencies; every layer's output is multiplied by a learned ``layer_scalar``; logits
are soft-capped. Three optional parts: per-layer embeddings (PLE: a small embedding per layer, added through a
gated projection after each layer, E2B/E4B), KV sharing (the last ``num_kv_shared_layers`` layers attend over
the keys of the last earlier layer of their type; they have no key/value projections and no cache of their
own), and a mixture of experts beside each layer's dense MLP (26B-A4B). Images attend both ways only in
sliding layers, and only in checkpoints with ``use_bidirectional_attention: "vision"`` (in every layer for the
unified checkpoints: ``vision_groups_every_layer``).

Module names follow the transformers weights (``layers.N.self_attn.q_proj``, ``layers.N.router.proj``,
``embed_tokens_per_layer``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime.attention import attention

from ..config import ConfigError
from .gemma import FULL, SLIDING, decoder_mask, softcap
from .layers import GatedMLP, activation
from .moe import SwitchGLU
from .rope import Rotary, Rotate, proportional_frequencies

__all__ = [
    "ClippableLinear",
    "Gemma4Decoder",
    "Gemma4DecoderConfig",
    "Gemma4RMSNorm",
    "per_layer_inputs",
    "rms_norm",
]

TEXT_DEFAULTS: dict[str, Any] = {
    # transformers' Gemma4TextConfig defaults; published configs may leave some out.
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "pad_token_id": 0,
}
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class Gemma4DecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    """Per layer: global layers have their own (``global_head_dim``)."""
    kv_heads: tuple[int, ...]
    sliding_window: int
    rope: Mapping[str, Mapping[str, Any]]
    """Per layer type: ``rope_type`` ("default" or "proportional"), ``rope_theta``, ``partial_rotary_factor``."""
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    """0: no per-layer embeddings."""
    vocab_size_per_layer_input: int = 0
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    bidirectional_vision: bool = False
    """Images attend both ways in sliding layers (``use_bidirectional_attention: "vision"``)."""
    vision_groups_every_layer: bool = False
    """With ``bidirectional_vision``: images attend both ways in every layer, the sliding window limiting only the
    causal part (the unified checkpoints' mask), not only within the window of sliding layers."""
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, text: Mapping[str, Any]) -> Gemma4DecoderConfig:
        """From a ``gemma4_text`` config in any layout: the published one (``global_head_dim``,
        ``num_global_key_value_heads``) or transformers 5.25's ``per_layer_config`` overrides."""
        text = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
        n_layers = int(text["num_hidden_layers"])
        layer_types = list(text.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)])
        if len(layer_types) != n_layers or set(layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"layer_types must name {n_layers} layers of {SLIDING!r}/{FULL!r}, got {layer_types}")
        layer_types[-1] = FULL  # as transformers forces it
        heads = int(text["num_attention_heads"])
        k_eq_v = bool(text.get("attention_k_eq_v", False))
        head_dims, kv_heads = _per_layer_sizes(text, layer_types, k_eq_v)
        rope = {
            kind: {**DEFAULT_ROPE[kind], **((text.get("rope_parameters") or {}).get(kind) or {})}
            for kind in DEFAULT_ROPE
        }
        for kind, params in rope.items():
            if params.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"unsupported rope_type {params.get('rope_type')!r} for {kind} layers")
        shared = int(text.get("num_kv_shared_layers") or 0)
        if shared and set(layer_types[: n_layers - shared]) != set(layer_types):
            raise ConfigError(
                f"num_kv_shared_layers={shared}: every layer type that shares keys needs an earlier layer of that type"
            )
        moe = bool(text.get("enable_moe_block", False))
        if moe and not all(text.get(k) for k in ("num_experts", "top_k_experts", "moe_intermediate_size")):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        return cls(
            hidden_size=int(text["hidden_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            layer_types=tuple(layer_types),
            head_dims=head_dims,
            kv_heads=kv_heads,
            sliding_window=int(text["sliding_window"]),
            rope=rope,
            rms_norm_eps=float(text["rms_norm_eps"]),
            hidden_activation=str(text["hidden_activation"]),
            attention_bias=bool(text.get("attention_bias", False)),
            attention_k_eq_v=k_eq_v,
            final_logit_softcapping=text.get("final_logit_softcapping"),
            num_kv_shared_layers=shared,
            use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
            hidden_size_per_layer_input=int(text.get("hidden_size_per_layer_input") or 0),
            vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input") or text["vocab_size"]),
            enable_moe_block=moe,
            num_experts=int(text.get("num_experts") or 0),
            top_k_experts=int(text.get("top_k_experts") or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
            bidirectional_vision=text.get("use_bidirectional_attention") == "vision",
            pad_token_id=int(text.get("pad_token_id") or 0),
        )

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def cache_index(self, layer: int) -> int:
        """Which cache a layer attends over: its own, or (KV-shared layers) the last earlier one of its type."""
        first = self.first_shared_layer
        if layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def shares_kv(self, layer: int) -> bool:
        return layer >= self.first_shared_layer


def _per_layer_sizes(text: Mapping[str, Any], layer_types: list[str], k_eq_v: bool) -> tuple[tuple[int, ...], ...]:
    """(head_dim, kv_heads) of every layer: the global layers' from ``per_layer_config`` (transformers 5.25's
    saved form: overrides by layer index) or from ``global_head_dim`` / ``num_global_key_value_heads`` (the
    latter only with ``attention_k_eq_v``, as transformers reads it)."""
    head_dim, kv = int(text["head_dim"]), int(text["num_key_value_heads"])
    overrides: dict[int, Mapping[str, Any]] = {}
    if isinstance(text.get("per_layer_config"), Mapping):
        for key, value in text["per_layer_config"].items():
            unknown = set(value) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"per_layer_config[{key}] overrides {sorted(unknown)}, which is not supported")
            overrides[int(key)] = value
    else:
        override: dict[str, Any] = {"head_dim": text.get("global_head_dim") or 512}
        if k_eq_v and text.get("num_global_key_value_heads"):
            override["num_key_value_heads"] = text["num_global_key_value_heads"]
        overrides = {i: override for i, kind in enumerate(layer_types) if kind == FULL}
    dims = tuple(int(overrides.get(i, {}).get("head_dim", head_dim)) for i in range(len(layer_types)))
    heads = tuple(int(overrides.get(i, {}).get("num_key_value_heads", kv)) for i in range(len(layer_types)))
    return dims, heads


def per_layer_inputs(decoder: nn.Module, ids: mx.array, inputs_embeds: mx.array, layers: int, width: int) -> mx.array:
    """The per-layer inputs (..., layers * width) of a decoder holding ``embed_tokens_per_layer``,
    ``per_layer_model_projection`` and ``per_layer_projection_norm`` (Gemma 3n, Gemma 4 E2B / E4B): each layer's
    slice averages (over sqrt(2)) the token's own scaled per-layer embedding and a normed projection of
    ``inputs_embeds`` (which may hold media features). ``ids`` must all lie in the per-layer table."""
    token = decoder.embed_tokens_per_layer(ids)
    token = token * mx.array(width**0.5, dtype=token.dtype)
    shape = (*inputs_embeds.shape[:-1], layers, width)
    projected = decoder.per_layer_model_projection(inputs_embeds) * (inputs_embeds.shape[-1] ** -0.5)
    projected = decoder.per_layer_projection_norm(projected.reshape(shape))
    mixed = (projected + token.reshape(shape)) * (2.0**-0.5)
    return mixed.reshape(*shape[:-2], -1).astype(inputs_embeds.dtype)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """x / rms(x) (* weight), computed in float32 and returned in x's dtype."""
    scale = None if weight is None else weight.astype(mx.float32)
    return mx.fast.rms_norm(x.astype(mx.float32), scale, eps).astype(x.dtype)


class Gemma4RMSNorm(nn.Module):
    """RMSNorm scaled by its weight (Gemma 4 stores the scale itself, not an offset from one)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


class ClippableLinear(nn.Module):
    """A bias-free linear layer (``linear``) that may clamp its input and output to stored bounds."""

    def __init__(self, dims: int, out: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(dims, out, bias=False)
        if clipped:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


class Gemma4Attention(nn.Module):
    """Normed queries, keys and values, attention scale 1. A KV-shared layer has only its query and output
    projections and attends over its source layer's keys (``cache.attend_shared``, or ``shared`` without a
    cache)."""

    def __init__(self, c: Gemma4DecoderConfig, layer: int) -> None:
        super().__init__()
        self.kind = c.layer_types[layer]
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.kv_heads[layer], c.head_dims[layer]
        self.reuses_kv = c.shares_kv(layer)
        self.eps = c.rms_norm_eps
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        if not self.reuses_kv:
            self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
            if not (c.attention_k_eq_v and self.kind == FULL):
                self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=bias)

    def __call__(
        self, x: mx.array, rotate: Rotate, mask: Any, cache: Any, shared: dict[str, tuple[mx.array, mx.array]]
    ) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(batch, length, self.n_heads, -1))
        q = rotate(q.transpose(0, 2, 1, 3))
        if self.reuses_kv:
            if cache is not None:
                out = cache.attend_shared(q, scale=1.0, mask=mask)
            else:
                keys, values = shared[self.kind]
                out = attention(q, keys, values, scale=1.0, mask=mask)
        else:
            raw_keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
            raw_values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1) if "v_proj" in self else raw_keys
            keys = rotate(self.k_norm(raw_keys).transpose(0, 2, 1, 3))
            values = rms_norm(raw_values, None, self.eps).transpose(0, 2, 1, 3)
            if cache is not None:
                out = cache.attend(q, keys, values, scale=1.0, mask=mask)
            else:
                shared[self.kind] = keys, values  # the last layer of each type before the shared ones wins
                out = attention(q, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Gemma4Router(nn.Module):
    """Picks each token's experts from its RMS-normed, learned-scaled state; the chosen experts' renormalised
    probabilities are then scaled per expert."""

    def __init__(self, c: Gemma4DecoderConfig) -> None:
        super().__init__()
        self.top_k, self.eps = c.top_k_experts, c.rms_norm_eps
        self.proj = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.scale = mx.ones((c.hidden_size,))
        self.per_expert_scale = mx.ones((c.num_experts,))
        self._root = c.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's chosen experts (..., k) and their weights (..., k)."""
        scores = self.proj(rms_norm(x, None, self.eps) * self.scale * self._root)
        probs = mx.softmax(scores.astype(mx.float32), axis=-1)
        chosen = mx.stop_gradient(mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :])
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return chosen, weights * self.per_expert_scale[chosen]


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, c: Gemma4DecoderConfig, layer: int) -> None:
        super().__init__()
        self.kind = c.layer_types[layer]
        self.self_attn = Gemma4Attention(c, layer)
        wide = 2 if c.use_double_wide_mlp and c.shares_kv(layer) else 1
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size * wide, c.hidden_activation)
        eps = c.rms_norm_eps
        self.input_layernorm = Gemma4RMSNorm(c.hidden_size, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(c.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, eps)
        self.layer_scalar = mx.ones((1,))
        if c.hidden_size_per_layer_input:
            self.per_layer_input_gate = nn.Linear(c.hidden_size, c.hidden_size_per_layer_input, bias=False)
            self.per_layer_projection = nn.Linear(c.hidden_size_per_layer_input, c.hidden_size, bias=False)
            self.post_per_layer_input_norm = Gemma4RMSNorm(c.hidden_size, eps)
            self._act = activation(c.hidden_activation)
        if c.enable_moe_block:
            self.router = Gemma4Router(c)
            self.experts = SwitchGLU(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.hidden_activation)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(c.hidden_size, eps)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(c.hidden_size, eps)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(c.hidden_size, eps)

    def __call__(
        self,
        x: mx.array,
        rotate: Rotate,
        mask: Any,
        cache: Any,
        shared: dict[str, tuple[mx.array, mx.array]],
        per_layer_input: mx.array | None,
    ) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotate, mask, cache, shared))
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if "router" in self:
            chosen, weights = self.router(h)
            experts = self.experts(self.pre_feedforward_layernorm_2(h), chosen)
            mixed = (experts * weights[..., None].astype(experts.dtype)).sum(axis=-2)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(mixed)
        h = h + self.post_feedforward_layernorm(ff)
        if per_layer_input is not None:
            gated = self._act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar.astype(h.dtype)


def _rotary(c: Gemma4DecoderConfig, kind: str) -> Rotary:
    params = c.rope[kind]
    head_dim = next(d for d, k in zip(c.head_dims, c.layer_types) if k == kind)
    theta = float(params.get("rope_theta", 10_000.0))
    if params.get("rope_type", "default") == "proportional":
        fraction = float(params.get("partial_rotary_factor", 1.0))
        factor = float(params.get("factor", 1.0))
        return Rotary(head_dim, theta, inv_freq=proportional_frequencies(head_dim, theta, fraction, factor))
    return Rotary(head_dim, theta)


class Gemma4Decoder(nn.Module):
    def __init__(self, config: Gemma4DecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [Gemma4DecoderLayer(c, i) for i in range(c.num_hidden_layers)]
        self.norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.hidden_size_per_layer_input:
            width = c.num_hidden_layers * c.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(c.vocab_size_per_layer_input, width)
            self.per_layer_model_projection = nn.Linear(c.hidden_size, width, bias=False)
            self.per_layer_projection_norm = Gemma4RMSNorm(c.hidden_size_per_layer_input, c.rms_norm_eps)
        self._rotary = {kind: _rotary(c, kind) for kind in set(c.layer_types)}

    @property
    def per_layer_width(self) -> int:
        """How much wider than hidden_size the decoder's input embeddings are (the per-layer inputs)."""
        return self.config.num_hidden_layers * self.config.hidden_size_per_layer_input

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings times sqrt(hidden), the factor rounded to the weights' dtype as in the reference."""
        embeds = self.embed_tokens(input_ids)
        return embeds * mx.array(self.config.hidden_size**0.5, dtype=embeds.dtype)

    def with_per_layer_inputs(self, input_ids: mx.array, inputs_embeds: mx.array) -> mx.array:
        """``inputs_embeds`` with the per-layer inputs appended on the last axis (unchanged without PLE): each
        layer's slice mixes the token's own per-layer embedding with a projection of ``inputs_embeds``, which may
        hold media features. ``input_ids`` should name the padding token at media positions, as transformers'."""
        c = self.config
        if not c.hidden_size_per_layer_input:
            return inputs_embeds
        ids = mx.where(input_ids >= c.vocab_size_per_layer_input, c.pad_token_id, input_ids)
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
        """``inputs_embeds`` as ``with_per_layer_inputs`` gives them; ``cache`` holds one entry per layer that
        keeps keys (the KV-shared layers have none)."""
        c = self.config
        h, per_layer = inputs_embeds[..., : c.hidden_size], None
        if c.hidden_size_per_layer_input:
            per_layer = inputs_embeds[..., c.hidden_size :].reshape(
                *h.shape[:-1], c.num_hidden_layers, c.hidden_size_per_layer_input
            )
        length = h.shape[1]
        offset = cache[0].offset if cache else 0
        start = offset + (cache[0].position_delta if cache else 0)
        rotate: dict[str, Rotate] = {}
        masks: dict[str, Any] = {}
        for kind, rotary in self._rotary.items():
            rotate[kind] = rotary.at_offset(start) if position_ids is None else rotary.at_positions(position_ids)
            layer_cache = cache[c.layer_types.index(kind)] if cache else None
            sliding = kind == SLIDING
            both_ways = c.bidirectional_vision and (sliding or c.vision_groups_every_layer)
            groups = attention_groups if both_ways else None
            window = c.sliding_window if sliding else None
            masks[kind] = decoder_mask(
                length,
                layer_cache,
                attention_mask,
                groups,
                h.dtype,
                window=window,
                window_limits_groups=not c.vision_groups_every_layer,
            )
        shared: dict[str, tuple[mx.array, mx.array]] = {}
        for i, layer in enumerate(self.layers):
            layer_cache = cache[c.cache_index(i)] if cache else None
            layer_input = None if per_layer is None else per_layer[:, :, i]
            h = layer(h, rotate[layer.kind], masks[layer.kind], layer_cache, shared, layer_input)
        return self.norm(h)

    def make_cache_kinds(self) -> list[str]:
        """The layer type of each cache the decoder reads (one per layer that keeps keys)."""
        return list(self.config.layer_types[: self.config.first_shared_layer])

    def compute_logits(self, hidden: mx.array, lm_head: nn.Module | None = None) -> mx.array:
        logits = self.embed_tokens.as_linear(hidden) if lm_head is None else lm_head(hidden)
        return softcap(logits, self.config.final_logit_softcapping)
