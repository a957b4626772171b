"""Gemma 3n's audio encoder (``gemma3n_audio``), a Universal Speech Model conformer.

Log-mel frames (10 ms hop) go through two 3x3 stride-2 convolutions (each padded two frames at the end in time
and one bin each side in frequency, then a cumulative group norm: statistics over the frequency bins and channels
of every frame up to the current one) and a projection, then conformer blocks: half-step feed-forward, chunked
local self-attention with relative position logits (Transformer-XL style, soft-capped), a causal depthwise
convolution block, a second half-step feed-forward. Every ``conf_reduction_factor``-th output frame is kept.

Unlike Gemma 4's tower (nn/conformer.py) there are no clipped linears, keys are not rescaled, the relative
positions span only the reachable distances, and invalid logits take the dtype's lowest value.

Module names follow the transformers weights (``subsample_conv_projection.conv_0.conv``,
``conformer.N.attention.attn.relative_position_embedding.pos_proj``, ``conformer.N.lconv1d.depthwise_conv1d``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from .gemma4 import Gemma4RMSNorm

__all__ = ["USMAudioEncoder", "USMConfig"]


@dataclass(frozen=True)
class USMConfig:
    # transformers' Gemma3nAudioConfig defaults.
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, int] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))
    vocab_size: int = 128
    vocab_offset: int = 262_272

    @classmethod
    def from_hf(cls, audio: Mapping[str, Any]) -> USMConfig:
        names = set(cls.__dataclass_fields__)
        values: dict[str, Any] = {k: v for k, v in audio.items() if k in names and v is not None}
        values["sscp_conv_channel_size"] = tuple(int(c) for c in values.get("sscp_conv_channel_size", (128, 32)))
        for key in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            if key in values:
                values[key] = tuple(tuple(int(v) for v in pair) for pair in values[key])
        config = cls(**values)
        if len(config.sscp_conv_channel_size) != 2 or len(config.sscp_conv_kernel_size) != 2:
            raise ConfigError("gemma3n audio: the subsampling has exactly two convolutions")
        return config

    @property
    def time_stride(self) -> int:
        return math.prod(s[0] for s in self.sscp_conv_stride_size)


def _clamp(x: mx.array, bound: float) -> mx.array:
    bound = min(bound, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)


class CumulativeGroupNorm(nn.Module):
    """Per frame: normalise by the mean and variance of all bins and channels of this and every earlier frame
    (each earlier frame's squared deviation taken from its own running mean), then scale per channel."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        """``x`` (batch, time, freq, channels)."""
        h = x.astype(mx.float32)
        per_frame = h.shape[2] * h.shape[3]
        count = mx.arange(1, h.shape[1] + 1, dtype=mx.float32)[None, :, None, None] * per_frame
        mean = mx.cumsum(h.sum(axis=(2, 3), keepdims=True), axis=1) / count
        variance = mx.cumsum(((h - mean) ** 2).sum(axis=(2, 3), keepdims=True), axis=1) / count
        out = (h - mean) * mx.rsqrt(variance + self.eps) * self.weight.astype(mx.float32)
        return out.astype(x.dtype)


class SSCPConvBlock(nn.Module):
    def __init__(self, c: USMConfig, index: int) -> None:
        super().__init__()
        in_channels = 1 if index == 0 else c.sscp_conv_channel_size[index - 1]
        out_channels = c.sscp_conv_channel_size[index]
        self.kernel = c.sscp_conv_kernel_size[index]
        stride = c.sscp_conv_stride_size[index]
        self.conv = nn.Conv2d(in_channels, out_channels, self.kernel, stride=stride, bias=False)
        self.norm = CumulativeGroupNorm(out_channels, c.sscp_conv_group_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        # (batch, time, freq, channels): time padded at the end only, frequency one bin each side.
        x = mx.pad(x, [(0, 0), (0, self.kernel[0] - 1), (1, 1), (0, 0)])
        return nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype))))


class SubSampleConvProjection(nn.Module):
    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.conv_0 = SSCPConvBlock(c, 0)
        self.conv_1 = SSCPConvBlock(c, 1)
        freq = c.input_feat_size
        for (_, kernel), (_, stride) in zip(c.sscp_conv_kernel_size, c.sscp_conv_stride_size):
            freq = (freq + 2 - kernel) // stride + 1
        self.input_proj_linear = nn.Linear(freq * c.sscp_conv_channel_size[1], c.hidden_size, bias=False)

    def __call__(self, features: mx.array) -> mx.array:
        x = self.conv_1(self.conv_0(features[..., None]))
        batch, time = x.shape[:2]
        return self.input_proj_linear(x.reshape(batch, time, -1))


class FeedForward(nn.Module):
    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.pre_layer_norm = Gemma4RMSNorm(c.hidden_size)
        self.ffw_layer_1 = nn.Linear(c.hidden_size, 4 * c.hidden_size, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * c.hidden_size, c.hidden_size, bias=False)
        self.post_layer_norm = Gemma4RMSNorm(c.hidden_size)
        self.clip, self.weight = c.gradient_clipping, c.conf_residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(self.pre_layer_norm(_clamp(x, self.clip)))))
        return x + self.post_layer_norm(_clamp(h, self.clip)) * self.weight


class RelativePositionEmbedding(nn.Module):
    """Projected sinusoids of the distances a query can reach (``past`` back to ``future`` ahead)."""

    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.past = max(0, c.conf_attention_context_left - 1)
        self.future = c.conf_attention_context_right
        self.channels = c.hidden_size

    def embeddings(self, dtype: mx.Dtype) -> mx.array:
        half = self.channels // 2
        increment = math.log(1.0e4) / max(half - 1, 1)
        inv_timescales = mx.exp(mx.arange(half, dtype=mx.float32) * -increment)
        distances = mx.arange(self.past, -self.future - 1, -1, dtype=mx.float32)
        scaled = distances[:, None] * inv_timescales[None]
        return self.pos_proj(mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1).astype(dtype))


class ChunkedAttention(nn.Module):
    """Self-attention in blocks of ``chunk`` queries, each over ``past`` frames before the block to ``future``
    after it, with learned per-dimension query scales, relative-position logits and a tanh soft cap."""

    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.heads = c.conf_num_attention_heads
        self.head_dim = c.hidden_size // self.heads
        self.chunk = c.conf_attention_chunk_size
        self.past = max(0, c.conf_attention_context_left - 1)
        self.future = c.conf_attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap = c.conf_attention_logit_cap
        self.q_scale = self.head_dim**-0.5 / math.log(2)  # 1 / softplus(0)
        self.relative_position_embedding = RelativePositionEmbedding(c)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        query = mx.arange(self.chunk)[:, None]
        key = mx.arange(self.context)[None]
        self._local = (key >= query) & (key <= query + self.past + self.future)  # (chunk, context)

    def _windows(self, x: mx.array, blocks: int) -> mx.array:
        """(batch, time, ...) -> (batch, blocks, context, ...): block b's keys start ``past`` frames before its
        first query; frames outside the clip are zeros (False)."""
        pad = [(0, 0), (self.past, self.future + self.chunk - 1)] + [(0, 0)] * (x.ndim - 2)
        index = mx.arange(blocks)[:, None] * self.chunk + mx.arange(self.context)[None]
        return mx.pad(x, pad)[:, index]

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        batch, time, _ = x.shape
        shape = (batch, time, self.heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale)
        blocks = -(-time // self.chunk)
        q = mx.pad(q, [(0, 0), (0, blocks * self.chunk - time), (0, 0), (0, 0)])
        q = q.reshape(batch, blocks, self.chunk, self.heads, self.head_dim).transpose(0, 3, 1, 2, 4)
        k = self._windows(k, blocks).transpose(0, 3, 1, 4, 2)  # (batch, heads, blocks, dim, context)
        v = self._windows(v, blocks).transpose(0, 3, 1, 2, 4)  # (batch, heads, blocks, context, dim)
        content = q @ k
        relative = self.relative_position_embedding.embeddings(q.dtype).reshape(-1, self.heads, self.head_dim)
        by_distance = q.reshape(batch, self.heads, -1, self.head_dim) @ relative.transpose(1, 2, 0)
        logits = content + self._shift(by_distance.reshape(batch, self.heads, blocks, self.chunk, -1))
        logits = mx.tanh(logits / self.cap) * self.cap
        allowed = self._windows(valid, blocks)[:, None, :, None, :] & self._local
        logits = mx.where(allowed, logits, mx.finfo(logits.dtype).min)
        weights = mx.softmax(logits.astype(mx.float32), axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 3, 1, 4).reshape(batch, blocks * self.chunk, -1)
        return out[:, :time]

    def _shift(self, x: mx.array) -> mx.array:
        """Per-distance logits (largest distance first) laid out per context key: pad, flatten, cut, fold."""
        batch, heads, blocks, chunk, span = x.shape
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 0), (0, self.context + 1 - span)])
        x = x.reshape(batch, heads, blocks, chunk * (self.context + 1))[..., : chunk * self.context]
        return x.reshape(batch, heads, blocks, chunk, self.context)


class ConformerAttention(nn.Module):
    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.pre_attn_norm = Gemma4RMSNorm(c.hidden_size)
        self.attn = ChunkedAttention(c)
        self.post = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.post_norm = Gemma4RMSNorm(c.hidden_size)
        self.clip = c.gradient_clipping

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        h = self.post(self.attn(self.pre_attn_norm(_clamp(x, self.clip)), valid))
        return x + self.post_norm(_clamp(h, self.clip))


class LightConv1d(nn.Module):
    """Gated linear unit, causal depthwise convolution over time, norm, activation, projection; residual."""

    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.pre_layer_norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.linear_start = nn.Linear(c.hidden_size, 2 * c.hidden_size, bias=False)
        k = c.conf_conv_kernel_size
        self.depthwise_conv1d = nn.Conv1d(c.hidden_size, c.hidden_size, k, groups=c.hidden_size, bias=False)
        self.conv_norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.linear_end = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.clip, self.kernel = c.gradient_clipping, k

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        half = h.shape[-1] // 2
        h = h[..., :half] * mx.sigmoid(h[..., half:])
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.kernel - 1, 0), (0, 0)]))
        return x + self.linear_end(nn.silu(self.conv_norm(_clamp(h, self.clip))))


class ConformerBlock(nn.Module):
    def __init__(self, c: USMConfig) -> None:
        super().__init__()
        self.ffw_layer_start = FeedForward(c)
        self.attention = ConformerAttention(c)
        self.lconv1d = LightConv1d(c)
        self.ffw_layer_end = FeedForward(c)
        self.norm = Gemma4RMSNorm(c.hidden_size)
        self.clip = c.gradient_clipping

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), valid)
        x = self.ffw_layer_end(self.lconv1d(x * valid[..., None].astype(x.dtype)))
        return self.norm(_clamp(x, self.clip))


class USMAudioEncoder(nn.Module):
    """``audio_tower``: log-mel ``input_features`` (batch, frames, mel) and their valid-frame mask -> (batch,
    output frames, hidden) (zeros at invalid frames) and the valid output frames' mask."""

    def __init__(self, config: USMConfig) -> None:
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.conformer = [ConformerBlock(config) for _ in range(config.conf_num_hidden_layers)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.subsample_conv_projection.conv_0.norm.weight.dtype

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        c = self.config
        x = self.subsample_conv_projection(features.astype(self.dtype))
        frames = mx.minimum(mx.arange(x.shape[1]) * c.time_stride, mask.shape[1] - 1)
        valid = mask.astype(mx.bool_)[:, frames]
        for block in self.conformer:
            x = block(x, valid)
        if c.conf_reduction_factor > 1:
            x, valid = x[:, :: c.conf_reduction_factor], valid[:, :: c.conf_reduction_factor]
        return mx.where(valid[..., None], x, mx.array(0, x.dtype)), valid
