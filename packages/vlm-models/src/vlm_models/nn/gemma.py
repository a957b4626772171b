"""The Gemma 2 / Gemma 3 text decoder: sandwich norms, (1 + w) RMSNorm, scaled embeddings, alternating
sliding-window and global layers, and optional tanh soft-capping of attention scores and logits.

Gemma 3 adds RMSNorm on queries and keys and gives sliding and global layers their own rotary base; Gemma 2
(the PaliGemma 2 decoder) soft-caps instead. One class covers both, switched by ``GemmaDecoderConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime.masks import attention_mask_for

from ..config import ConfigError
from ..family import FamilyDefaults
from .layers import Attention, GatedMLP
from .rope import Rotary, Rotate

__all__ = [
    "FULL",
    "GEMMA_DEFAULTS",
    "GemmaDecoder",
    "GemmaDecoderConfig",
    "GemmaGeneration",
    "GemmaRMSNorm",
    "SLIDING",
    "decoder_mask",
    "softcap",
]

SLIDING, FULL = "sliding_attention", "full_attention"

GEMMA_DEFAULTS = {
    # The transformers defaults Gemma 2 and Gemma 3 text configs share; published configs omit some of them.
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class GemmaDecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    sliding_window: int
    query_pre_attn_scalar: float
    global_rope_theta: float
    local_rope_theta: float
    global_rope_position_scale: float = 1.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    qk_norm: bool = False
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    first_position: int = 0
    """Rotary position of the first token (PaliGemma counts from 1)."""
    window_limits_groups: bool = True
    """Whether sliding layers bound bidirectional groups by their window too (Gemma 3) or not (PaliGemma)."""

    @classmethod
    def from_hf(
        cls,
        text: Mapping[str, Any],
        *,
        defaults: Mapping[str, Any],
        qk_norm: bool,
        first_position: int = 0,
        window_limits_groups: bool = True,
    ) -> GemmaDecoderConfig:
        """From a Gemma 2 / 3 text config in either layout: transformers 5 ``layer_types`` and per-type
        ``rope_parameters``, or the published ``sliding_window_pattern``, ``rope_theta``,
        ``rope_local_base_freq`` and ``rope_scaling``. ``defaults`` are the family's transformers defaults,
        which published configs leave out (Gemma 3 4B's names neither its heads nor its vocabulary)."""
        text = {**defaults, **text}
        sliding_pattern = int(text.get("sliding_window_pattern") or 6)
        try:
            n_layers = int(text["num_hidden_layers"])
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
        except KeyError as exc:
            raise ConfigError(f"text config lacks {exc.args[0]!r}") from None
        layer_types = tuple(
            text.get("layer_types") or [SLIDING if (i + 1) % sliding_pattern else FULL for i in range(n_layers)]
        )
        unknown = set(layer_types) - {SLIDING, FULL}
        if unknown or len(layer_types) != n_layers:
            raise ConfigError(f"layer_types must name {n_layers} layers of {SLIDING!r}/{FULL!r}, got {layer_types}")
        rope = text.get("rope_parameters") or {}
        per_type = FULL in rope or SLIDING in rope
        global_rope = dict(rope.get(FULL) or {}) if per_type else dict(rope)
        local_rope = dict(rope.get(SLIDING) or {}) if per_type else {}
        if not per_type and text.get("rope_scaling"):
            global_rope.update(text["rope_scaling"])
        global_theta = float(global_rope.get("rope_theta", text.get("rope_theta", 10_000.0)))
        local_theta = float(local_rope.get("rope_theta", text.get("rope_local_base_freq", global_theta)))
        kind = global_rope.get("rope_type", global_rope.get("type", "default"))
        if kind not in ("default", "linear") or local_rope.get("rope_type", "default") != "default":
            raise ConfigError(f"unsupported rope scaling {global_rope} (supported: default, linear)")
        scale = 1.0 / float(global_rope.get("factor", 1.0)) if kind == "linear" else 1.0
        return cls(
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            layer_types=layer_types,
            sliding_window=int(text.get("sliding_window") or 4096),
            query_pre_attn_scalar=float(text.get("query_pre_attn_scalar") or 256),
            global_rope_theta=global_theta,
            local_rope_theta=local_theta,
            global_rope_position_scale=scale,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            hidden_activation=str(text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"),
            attention_bias=bool(text.get("attention_bias", False)),
            qk_norm=qk_norm,
            attn_logit_softcapping=text.get("attn_logit_softcapping"),
            final_logit_softcapping=text.get("final_logit_softcapping"),
            first_position=first_position,
            window_limits_groups=window_limits_groups,
        )


def softcap(x: mx.array, cap: float | None) -> mx.array:
    """cap * tanh(x / cap): bounds x to (-cap, cap) smoothly; None leaves x as it is."""
    return x if cap is None else mx.tanh(x / cap) * cap


class GemmaRMSNorm(nn.Module):
    """RMSNorm whose stored weight is an offset from one: x / rms(x) * (1 + w), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class GemmaAttention(Attention):
    """Grouped-query attention with optional RMSNorm on queries and keys and optional soft-capped scores."""

    def __init__(self, c: GemmaDecoderConfig) -> None:
        super().__init__(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_bias,
            scale=c.query_pre_attn_scalar**-0.5,
            qk_norm=(lambda dim: GemmaRMSNorm(dim, c.rms_norm_eps)) if c.qk_norm else None,
        )
        self.logit_cap = c.attn_logit_softcapping

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any) -> mx.array:
        if self.logit_cap is None:
            return super().attend(q, k, v, mask, cache)
        # Fused attention cannot soft-cap its scores: spell it out (caches here store keys plainly).
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            if isinstance(k, tuple):
                raise ValueError(
                    "soft-capped attention (Gemma 2, PaliGemma 2) cannot use a quantized KV cache (kv_bits)"
                )
        batch, heads, n_q, dim = q.shape
        groups = heads // k.shape[1]
        q = (q * self.scale).reshape(batch, k.shape[1], groups, n_q, dim)
        scores = softcap((q @ k[:, :, None].swapaxes(-1, -2)).astype(mx.float32), self.logit_cap)
        if isinstance(mask, str):
            n_k = k.shape[2]
            mask = mx.arange(n_k - n_q, n_k)[:, None] >= mx.arange(n_k)[None]
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))[:, :, None]
            scores = mx.where(mask, scores, mx.finfo(mx.float32).min) if mask.dtype == mx.bool_ else scores + mask
        weights = mx.softmax(scores, axis=-1).astype(v.dtype)
        return (weights @ v[:, :, None]).reshape(batch, heads, n_q, -1)


class GemmaDecoderLayer(nn.Module):
    """x + norm(attn(norm(x))), then + norm(mlp(norm(x))): each branch normed on the way in and out."""

    def __init__(self, c: GemmaDecoderConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = GemmaAttention(c)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any, cache: Any = None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotate, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaDecoder(nn.Module):
    def __init__(self, config: GemmaDecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [GemmaDecoderLayer(c, kind) for kind in c.layer_types]
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self._rotary = {
            FULL: Rotary(c.head_dim, c.global_rope_theta, c.global_rope_position_scale),
            SLIDING: Rotary(c.head_dim, c.local_rope_theta),
        }

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings times sqrt(hidden), the factor rounded to the weights' dtype as in the reference."""
        embeds = self.embed_tokens(input_ids)
        return embeds * mx.array(self.config.hidden_size**0.5, dtype=embeds.dtype)

    def __call__(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> mx.array:
        length = inputs_embeds.shape[1]
        offset = cache[0].offset if cache else 0
        # A batch's rows continue from their own positions (left padding, rows joined at other lengths).
        start = offset + (cache[0].position_delta if cache else 0) + self.config.first_position
        rotate: dict[str, Rotate] = {}
        masks: dict[str, Any] = {}
        for kind, rotary in self._rotary.items():
            if kind not in self.config.layer_types:
                continue
            if position_ids is None:
                rotate[kind] = rotary.at_offset(start)
            else:
                rotate[kind] = rotary.at_positions(position_ids)
            first = self.config.layer_types.index(kind)
            layer_cache = cache[first] if cache else None
            masks[kind] = self._mask(kind, length, layer_cache, attention_mask, attention_groups, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            kind = layer.layer_type
            h = layer(h, rotate[kind], masks[kind], cache[i] if cache else None)
        return self.norm(h)

    def _mask(
        self,
        kind: str,
        n_queries: int,
        cache: Any,
        key_padding: mx.array | None,
        groups: mx.array | None,
        dtype: mx.Dtype,
    ) -> Any:
        window = self.config.sliding_window if kind == SLIDING else None
        return decoder_mask(
            n_queries,
            cache,
            key_padding,
            groups,
            dtype,
            window=window,
            window_limits_groups=self.config.window_limits_groups,
        )

    def compute_logits(self, hidden: mx.array, lm_head: nn.Module | None) -> mx.array:
        logits = self.embed_tokens.as_linear(hidden) if lm_head is None else lm_head(hidden)
        return softcap(logits, self.config.final_logit_softcapping)


def decoder_mask(
    n_queries: int,
    cache: Any,
    key_padding: mx.array | None,
    groups: mx.array | None,
    dtype: mx.Dtype,
    *,
    window: int | None,
    window_limits_groups: bool = True,
) -> Any:
    """The mask of ``n_queries`` new tokens in a layer that sees ``window`` keys back (None: all of them), given
    its cache (which knows which keys it hands attention), the prompt's padding (batch, keys) and bidirectional
    ``groups`` (batch, n_queries)."""
    shape = dict(window=window, groups=groups, key_padding=key_padding, window_limits_groups=window_limits_groups)
    if cache is not None:
        return cache.make_mask(n_queries, dtype, **shape)
    return attention_mask_for(n_queries, dtype, **shape)


class GemmaGeneration(FamilyDefaults):
    """The runtime's decoder steps for a Gemma family model holding its decoder at ``self.model.language_model``
    (which takes the prompt's bidirectional groups and soft-caps the logits) and, unless the embeddings are tied,
    an ``lm_head``."""

    model: Any
    config: Any

    def hidden_states(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> mx.array:
        return self.model.language_model(
            inputs_embeds,
            cache=cache,
            position_ids=position_ids,
            attention_mask=attention_mask,
            attention_groups=attention_groups,
        )

    def compute_logits(self, hidden: mx.array) -> mx.array:
        head = None if self.config.tie_word_embeddings else self.lm_head  # type: ignore[attr-defined]
        return self.model.language_model.compute_logits(hidden, head)
