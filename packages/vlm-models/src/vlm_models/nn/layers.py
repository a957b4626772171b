"""Attention with grouped KV heads, MLPs, and the pre-norm decoder layer used by Llama-style language models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime.attention import attention

from .fused import FusedLinears
from .rope import Rotate

__all__ = ["Attention", "CenteredLayerNorm", "GatedMLP", "MLP", "DecoderLayer", "ACTIVATIONS", "gated_activation"]

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "quick_gelu": nn.gelu_fast_approx,
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[mx.array], mx.array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class CenteredLayerNorm(nn.LayerNorm):
    """LayerNorm that subtracts the mean before MLX's fused kernel. The kernel takes the variance in one pass
    (E[x²] - E[x]²), which loses most of its digits when the spread is far below the mean: raw pixels of a flat
    patch (mean ~0.5, std ~0.007) come out 4e-4 off in float32, where a centred input is exact to 1e-7."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x - x.mean(axis=-1, keepdims=True))


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (``n_kv_heads`` divides ``n_heads``)."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        out_bias: bool = False,
        scale: float | None = None,
        qk_norm: Callable[[int], nn.Module] | None = None,
        in_dim: int | None = None,
    ) -> None:
        """``qk_norm`` builds a per-head norm (over head_dim) applied to queries and keys before rotation;
        ``in_dim``: the width queries, keys and values are projected from, where it is not ``hidden`` (an
        EAGLE-3 layer reads embeddings and features side by side)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        source = hidden if in_dim is None else in_dim
        self.q_proj = nn.Linear(source, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(source, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(source, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=out_bias)
        if qk_norm is not None:
            self.q_norm = qk_norm(head_dim)
            self.k_norm = qk_norm(head_dim)
        self._qkv: FusedLinears | None = None  # set at load by fuse_projections

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values as (batch, heads, length, head_dim), before rotation."""
        batch, length, _ = x.shape
        layers = (self.q_proj, self.k_proj, self.v_proj)
        fused = self._qkv(x, layers) if self._qkv is not None else None
        q, k, v = fused if fused is not None else (layer(x) for layer in layers)
        q = q.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any) -> mx.array:
        if cache is None:
            return attention(q, k, v, scale=self.scale, mask=mask)
        return cache.attend(q, k, v, scale=self.scale, mask=mask)

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any, cache: Any = None) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = self.project(x)
        out = self.attend(rotate(q), rotate(k), v, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


def _gated(act: Callable[[mx.array], mx.array]) -> Callable[[mx.array, mx.array], mx.array]:
    # One fused elementwise kernel for act(gate) * up; shapeless, so prompts of any length share one trace.
    return mx.compile(lambda gate, up: act(gate) * up, shapeless=True)


_GATED = {name: _gated(fn) for name, fn in ACTIVATIONS.items()}


def gated_activation(name: str) -> Callable[[mx.array, mx.array], mx.array]:
    """The fused ``act(gate) * up`` for activation ``name``."""
    activation(name)  # validates the name
    return _GATED[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self._gated = gated_activation(act)
        self._gate_up: FusedLinears | None = None  # set at load by fuse_projections

    def __call__(self, x: mx.array) -> mx.array:
        fused = self._gate_up(x, (self.gate_proj, self.up_proj)) if self._gate_up is not None else None
        gate, up = fused if fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self._gated(gate, up))


class MLP(nn.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self._act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self._act(self.fc1(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then a gated MLP."""

    def __init__(self, attention: Attention, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rotate, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
