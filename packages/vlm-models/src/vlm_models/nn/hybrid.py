"""The hybrid decoder of Qwen3-Next and Qwen3.5: gated delta-net linear-attention layers interleaved with gated
full-attention layers.

What differs from the Llama-style ``TextDecoder``: each layer mixes tokens either by linear attention
(nn/gated_delta.py, with a recurrent state instead of keys and values) or by attention whose output is gated by
sigmoid(a second half of the query projection); queries and keys are RMS-normed per head; the norms are
zero-centred, x / rms(x) * (1 + w); rotary turns only the leading ``partial_rotary_factor`` of each head; the MLPs
are dense or sparse with a shared expert (nn/moe.py).

Layer caches: a ``RecurrentCache`` per linear layer, a KV cache per attention layer (``make_cache``). Positions and
masks come from the first attention layer's cache, the one that stores keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime import KVCache, RecurrentCache
from vlm_runtime.masks import attention_mask_for

from ..config import ConfigError
from .decoder import LayerTaps, rotation
from .gated_delta import GatedDeltaNet, LinearAttentionConfig
from .gemma import GemmaRMSNorm
from .layers import Attention, GatedMLP
from .moe import MoEConfig, SparseMoE
from .rope import MultimodalRotary, Rotate, rotate_leading

__all__ = ["FULL", "LINEAR", "GatedAttention", "HybridDecoder", "HybridDecoderConfig", "HybridDecoderLayer"]

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class HybridDecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    linear: LinearAttentionConfig
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    moe: MoEConfig | None = None
    """Sparse MLPs in the layers ``moe.is_sparse`` picks."""

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, text: Mapping[str, Any], moe: MoEConfig | None = None) -> HybridDecoderConfig:
        """From a text config with every key present (families fill in their transformers defaults first).
        ``layer_types`` may be given as ``full_attention_interval`` (every n-th layer full attention)."""
        try:
            n_layers = int(text["num_hidden_layers"])
            hidden = int(text["hidden_size"])
            interval = int(text.get("full_attention_interval") or 4)
            layer_types = tuple(
                text.get("layer_types") or [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]
            )
            if set(layer_types) - {LINEAR, FULL} or len(layer_types) != n_layers:
                raise ConfigError(f"layer_types must name {n_layers} layers of {LINEAR!r}/{FULL!r}, got {layer_types}")
            rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
            linear = LinearAttentionConfig(
                hidden_size=hidden,
                num_key_heads=int(text["linear_num_key_heads"]),
                num_value_heads=int(text["linear_num_value_heads"]),
                key_head_dim=int(text["linear_key_head_dim"]),
                value_head_dim=int(text["linear_value_head_dim"]),
                conv_kernel=int(text["linear_conv_kernel_dim"]),
                rms_norm_eps=float(text["rms_norm_eps"]),
            )
            return cls(
                hidden_size=hidden,
                num_hidden_layers=n_layers,
                num_attention_heads=int(text["num_attention_heads"]),
                num_key_value_heads=int(text["num_key_value_heads"]),
                head_dim=int(text["head_dim"]),
                intermediate_size=int(text.get("intermediate_size") or 0),
                vocab_size=int(text["vocab_size"]),
                layer_types=layer_types,
                linear=linear,
                partial_rotary_factor=float(rope.get("partial_rotary_factor", text["partial_rotary_factor"])),
                rms_norm_eps=float(text["rms_norm_eps"]),
                hidden_act=str(text["hidden_act"]),
                attention_bias=bool(text.get("attention_bias", False)),
                moe=moe,
            )
        except KeyError as exc:
            raise ConfigError(f"the text config lacks {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


class GatedAttention(Attention):
    """Grouped-query attention whose query projection also yields, per head, a gate: the output is
    o_proj(attention * sigmoid(gate))."""

    def __init__(self, c: HybridDecoderConfig) -> None:
        super().__init__(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            qkv_bias=c.attention_bias,
            out_bias=c.attention_bias,
            qk_norm=lambda dim: GemmaRMSNorm(dim, c.rms_norm_eps),
        )
        self.q_proj = nn.Linear(c.hidden_size, 2 * c.num_attention_heads * c.head_dim, bias=c.attention_bias)

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any, cache: Any = None) -> mx.array:
        batch, length, _ = x.shape
        # Per head, the projection holds the query then the gate.
        query, gate = mx.split(self.q_proj(x).reshape(batch, length, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(query).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        out = self.attend(rotate(q), rotate(k), v, mask, cache).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(batch, length, -1)))


class HybridDecoderLayer(nn.Module):
    """Pre-norm residual block: linear attention or gated attention, then the MLP."""

    def __init__(self, c: HybridDecoderConfig, index: int) -> None:
        super().__init__()
        self.layer_type = c.layer_types[index]
        if self.layer_type == LINEAR:
            self.linear_attn = GatedDeltaNet(c.linear)
        else:
            self.self_attn = GatedAttention(c)
        if c.moe is not None and c.moe.is_sparse(index):
            self.mlp: nn.Module = SparseMoE(c.hidden_size, c.moe, c.hidden_act)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any, cache: Any, valid: mx.array | None) -> mx.array:
        h = self.input_layernorm(x)
        if self.layer_type == LINEAR:
            h = self.linear_attn(h, cache, valid)
        else:
            h = self.self_attn(h, rotate, mask, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridDecoder(nn.Module):
    def __init__(self, config: HybridDecoderConfig, rotary: MultimodalRotary) -> None:
        """``rotary`` turns the leading ``config.rotary_dim`` features of each head."""
        super().__init__()
        self.config = c = config
        if c.rotary_dim % 2 or not 0 < c.rotary_dim <= c.head_dim:
            raise ConfigError(f"partial_rotary_factor {c.partial_rotary_factor} of head dim {c.head_dim} is not usable")
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [HybridDecoderLayer(c, i) for i in range(c.num_hidden_layers)]
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self._rotary = rotary
        self._reference = c.layer_types.index(FULL) if FULL in c.layer_types else None

    def make_cache(self) -> list[Any]:
        return [RecurrentCache() if kind == LINEAR else KVCache() for kind in self.config.layer_types]

    def __call__(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Any] | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        taps: LayerTaps | None = None,
    ) -> mx.array:
        """``attention_mask``: (batch, keys) with 0 at padding, as the processor gives it for a padded batch; without
        one, a batched cache says which columns are padding. ``taps``: as ``TextDecoder`` takes them."""
        length = inputs_embeds.shape[1]
        reference = self._reference or 0
        rotate = rotation(self._rotary, cache, position_ids, length, reference)
        if self.config.rotary_dim < self.config.head_dim:
            rotate = rotate_leading(rotate, self.config.rotary_dim)
        mask = None
        if self._reference is not None:
            if cache:
                mask = cache[reference].make_mask(length, inputs_embeds.dtype, key_padding=attention_mask)
            else:
                mask = attention_mask_for(length, inputs_embeds.dtype, key_padding=attention_mask)
        valid = None if attention_mask is None else attention_mask[:, -length:]
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if taps is not None:
                taps.see(i, h)
            h = layer(h, rotate, mask, cache[i] if cache else None, valid)
        if taps is not None:
            taps.see(len(self.layers), h)
        return self.norm(h)
