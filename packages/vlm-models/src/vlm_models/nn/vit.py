"""Plain ViT pieces shared by the CLIP and SigLIP towers: bidirectional self-attention with biased projections
and the pre-norm LayerNorm encoder layer. Attribute names follow both families' transformers weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .layers import MLP

__all__ = ["EncoderLayer", "SelfAttention", "conv2d_weight_to_mlx", "selected_hidden_states"]


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over (batch, tokens, dim), with biased q/k/v/out projections."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        """``mask``: additive, broadcastable to (batch, heads, tokens, tokens); None attends everywhere."""
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class EncoderLayer(nn.Module):
    """Pre-norm ViT layer with LayerNorms: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def conv2d_weight_to_mlx(weight: mx.array, in_channels: int) -> mx.array:
    """Accept PyTorch's Conv2d layout (out, in, kh, kw) or MLX's (out, kh, kw, in); return MLX's."""
    if weight.ndim == 4 and weight.shape[1] == in_channels and weight.shape[-1] != in_channels:
        return weight.transpose(0, 2, 3, 1)
    return weight


def selected_hidden_states(
    h: mx.array, layers: Sequence[Callable[[mx.array], mx.array]], wanted: Sequence[int]
) -> mx.array:
    """The hidden states of ``wanted`` (indices into [h, after layer 1, ..., after layer N], negative from the end,
    as transformers' ``hidden_states``) concatenated on the feature axis. Layers past the deepest wanted one never
    run."""
    count = len(layers) + 1
    indices = [i % count if -count <= i < count else None for i in wanted]
    if None in indices:
        raise ValueError(f"vision feature layer(s) {list(wanted)} out of range for {count - 1} layers")
    states = [h]
    for layer in layers[: max(indices)]:
        states.append(layer(states[-1]))
    selected = [states[i] for i in indices]
    return selected[0] if len(selected) == 1 else mx.concatenate(selected, axis=-1)
