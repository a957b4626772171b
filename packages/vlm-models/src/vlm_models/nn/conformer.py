"""Gemma 4's audio encoder (``gemma4_audio``), a Universal Speech Model conformer.

Log-mel frames (10 ms hop) go through two stride-2 convolutions (40 ms per frame after them) and a projection,
then conformer blocks: half-step feed-forward, chunked local self-attention with relative position logits
(Transformer-XL style, soft-capped; each frame sees ``attention_context_left - 1`` frames back, itself included,
and ``attention_context_right`` ahead), a causal depthwise-convolution block, a second half-step feed-forward.
Linear layers may clamp their inputs and outputs to bounds stored in the checkpoint (``use_clipped_linears``).

Module names follow the transformers weights (``subsample_conv_projection.layer0.conv``,
``layers.N.self_attn.relative_k_proj``, ``layers.N.lconv1d.depthwise_conv1d``, ``output_proj``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import from_dict
from .gemma4 import ClippableLinear, Gemma4RMSNorm
from .layers import activation

__all__ = ["AudioEncoder", "AudioEncoderConfig", "relative_position_embeddings", "subsampled_mask"]


@dataclass(frozen=True)
class AudioEncoderConfig:
    # transformers' Gemma4AudioConfig defaults.
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, ...] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_hf(cls, audio: Mapping[str, Any]) -> AudioEncoderConfig:
        values = {k: v for k, v in audio.items() if v is not None}
        if "subsampling_conv_channels" in values:
            values["subsampling_conv_channels"] = tuple(values["subsampling_conv_channels"])
        return from_dict(cls, values)


def _clamp(x: mx.array, bound: float) -> mx.array:
    """transformers' guard against overflow: the bound, at most the dtype's largest value."""
    bound = min(bound, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)


def subsampled_mask(mask: mx.array) -> mx.array:
    """The valid-frame mask after the two stride-2 convolutions (every second frame, twice)."""
    return mask[:, ::2][:, ::2]


class SubSampleLayer(nn.Module):
    """3x3 stride-2 convolution (no bias), LayerNorm over channels (no bias), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """``x`` (batch, time, freq, channels), ``mask`` (batch, time) of valid frames."""
        x = x * mask[:, :, None, None].astype(x.dtype)
        return nn.relu(self.norm(self.conv(x))), mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, c: AudioEncoderConfig) -> None:
        super().__init__()
        first, second = c.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, first, c.rms_norm_eps)
        self.layer1 = SubSampleLayer(first, second, c.rms_norm_eps)
        # transformers sizes the projection for 128 mel bins read by a first layer of 128 channels.
        self.input_proj_linear = nn.Linear((first // 4) * second, c.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        batch, time = x.shape[:2]
        return self.input_proj_linear(x.reshape(batch, time, -1)), mask


class FeedForward(nn.Module):
    def __init__(self, c: AudioEncoderConfig) -> None:
        super().__init__()
        clip = c.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(c.hidden_size, 4 * c.hidden_size, clip)
        self.ffw_layer_2 = ClippableLinear(4 * c.hidden_size, c.hidden_size, clip)
        self.pre_layer_norm = Gemma4RMSNorm(c.hidden_size)
        self.post_layer_norm = Gemma4RMSNorm(c.hidden_size)
        self._act = activation(c.hidden_act)
        self.clip, self.weight = c.gradient_clipping, c.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clamp(x, self.clip))
        h = self.ffw_layer_2(self._act(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clamp(h, self.clip)) * self.weight


class LightConv1d(nn.Module):
    """Gated linear unit, causal depthwise convolution over time, norm, activation, projection; residual."""

    def __init__(self, c: AudioEncoderConfig) -> None:
        super().__init__()
        clip = c.use_clipped_linears
        self.linear_start = ClippableLinear(c.hidden_size, 2 * c.hidden_size, clip)
        self.linear_end = ClippableLinear(c.hidden_size, c.hidden_size, clip)
        self.depthwise_conv1d = nn.Conv1d(
            c.hidden_size, c.hidden_size, c.conv_kernel_size, groups=c.hidden_size, bias=False
        )
        self.pre_layer_norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.conv_norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        self._act = activation(c.hidden_act)
        self.clip, self.kernel = c.gradient_clipping, c.conv_kernel_size

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        half = h.shape[-1] // 2
        h = h[..., :half] * mx.sigmoid(h[..., half:])
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.kernel - 1, 0), (0, 0)]))  # causal: past frames only
        h = self._act(self.conv_norm(_clamp(h, self.clip)))
        return x + self.linear_end(h)


class ChunkedAttention(nn.Module):
    """Self-attention in blocks of ``attention_chunk_size`` queries, each over a window of context keys, with
    learned per-dimension query scales, relative-position logits and a tanh soft cap."""

    def __init__(self, c: AudioEncoderConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.chunk = c.attention_chunk_size
        self.past = c.attention_context_left - 1
        self.future = c.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap, self.invalid = c.attention_logit_cap, c.attention_invalid_logits_value
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        clip = c.use_clipped_linears
        self.q_proj = ClippableLinear(c.hidden_size, c.hidden_size, clip)
        self.k_proj = ClippableLinear(c.hidden_size, c.hidden_size, clip)
        self.v_proj = ClippableLinear(c.hidden_size, c.hidden_size, clip)
        self.post = ClippableLinear(c.hidden_size, c.hidden_size, clip)
        self.relative_k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def _context_windows(self, x: mx.array, blocks: int) -> mx.array:
        """(batch, time, heads, dim) -> (batch, blocks, context, heads, dim): block b's keys start ``past`` frames
        before its first query."""
        padded = mx.pad(x, [(0, 0), (self.past, self.future + self.chunk - 1), (0, 0), (0, 0)])
        index = mx.arange(blocks)[:, None] * self.chunk + mx.arange(self.context)[None]
        return padded[:, index]

    def _allowed(self, valid: mx.array, blocks: int) -> mx.array:
        """(batch, blocks, chunk, context): which keys each query may see."""
        query = mx.arange(blocks)[:, None, None] * self.chunk + mx.arange(self.chunk)[None, :, None]
        key = query - mx.arange(self.chunk)[None, :, None] - self.past + mx.arange(self.context)[None, None, :]
        distance = query - key
        in_reach = ((distance >= 0) & (distance < self.past)) | ((distance < 0) & (-distance < self.future))
        time = valid.shape[1]
        inside = (key >= 0) & (key < time) & (query < time)
        key_valid = valid[:, mx.clip(key, 0, time - 1)]  # (batch, blocks, chunk, context)
        return (in_reach & inside)[None] & key_valid

    def __call__(self, x: mx.array, position_embeddings: mx.array, valid: mx.array) -> mx.array:
        batch, time, _ = x.shape
        shape = (batch, time, self.heads, self.head_dim)
        q = self.q_proj(x).astype(mx.float32).reshape(shape)
        k = self.k_proj(x).astype(mx.float32).reshape(shape)
        v = self.v_proj(x).astype(mx.float32).reshape(shape)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32))
        k = k * self.k_scale
        blocks = -(-time // self.chunk)
        q = mx.pad(q, [(0, 0), (0, blocks * self.chunk - time), (0, 0), (0, 0)])
        q = q.reshape(batch, blocks, self.chunk, self.heads, self.head_dim).transpose(0, 3, 1, 2, 4)
        k = self._context_windows(k, blocks).transpose(0, 3, 1, 4, 2)  # (batch, heads, blocks, dim, context)
        v = self._context_windows(v, blocks).transpose(0, 3, 1, 2, 4)  # (batch, heads, blocks, context, dim)
        content = q @ k
        relative = self.relative_k_proj(position_embeddings).reshape(-1, self.heads, self.head_dim)
        by_distance = q.reshape(batch, self.heads, -1, self.head_dim) @ relative.astype(q.dtype).transpose(1, 2, 0)
        by_distance = self._shift(by_distance.reshape(batch, self.heads, blocks, self.chunk, -1))
        logits = mx.tanh((content + by_distance) / self.cap) * self.cap
        logits = mx.where(self._allowed(valid, blocks)[:, None], logits, self.invalid)
        weights = mx.softmax(logits, axis=-1)
        out = (weights @ v).transpose(0, 2, 3, 1, 4).reshape(batch, blocks * self.chunk, -1)[:, :time]
        return self.post(out.astype(x.dtype))

    def _shift(self, x: mx.array) -> mx.array:
        """Relative-position logits (one column per distance, largest first) laid out per context key: the
        Transformer-XL shift (pad, flatten, cut, fold)."""
        batch, heads, blocks, chunk, positions = x.shape
        x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (0, 0), (0, self.context + 1 - positions)])
        x = x.reshape(batch, heads, blocks, chunk * (self.context + 1))[..., : chunk * self.context]
        return x.reshape(batch, heads, blocks, chunk, self.context)


class ConformerLayer(nn.Module):
    def __init__(self, c: AudioEncoderConfig) -> None:
        super().__init__()
        self.feed_forward1 = FeedForward(c)
        self.feed_forward2 = FeedForward(c)
        self.self_attn = ChunkedAttention(c)
        self.lconv1d = LightConv1d(c)
        self.norm_pre_attn = Gemma4RMSNorm(c.hidden_size)
        self.norm_post_attn = Gemma4RMSNorm(c.hidden_size)
        self.norm_out = Gemma4RMSNorm(c.hidden_size)
        self.clip = c.gradient_clipping

    def __call__(self, x: mx.array, position_embeddings: mx.array, valid: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        attended = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), position_embeddings, valid)
        x = x + self.norm_post_attn(_clamp(attended, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


def relative_position_embeddings(c: AudioEncoderConfig, dtype: mx.Dtype) -> mx.array:
    """Sinusoidal embeddings ([sin..., cos...]) of the distances context/2, ..., 1, 0."""
    context = c.attention_chunk_size + c.attention_context_left - 1 + c.attention_context_right
    half = c.hidden_size // 2
    increment = math.log(10_000.0) / max(half - 1, 1)
    inv_timescales = mx.exp(mx.arange(half, dtype=mx.float32) * -increment)
    scaled = mx.arange(context // 2, -1, -1, dtype=mx.float32)[:, None] * inv_timescales[None]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1).astype(dtype)


class AudioEncoder(nn.Module):
    """``audio_tower``: log-mel ``input_features`` (batch, frames, mel) and their valid-frame mask -> (batch,
    frames / 4, output_proj_dims) and the mask of the valid output frames."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.layers = [ConformerLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    @property
    def dtype(self) -> mx.Dtype:
        return self.subsample_conv_projection.layer0.norm.weight.dtype  # read where no adapter wraps a weight

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, valid = self.subsample_conv_projection(features.astype(self.dtype), mask.astype(mx.bool_))
        positions = relative_position_embeddings(self.config, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, valid)
        return self.output_proj(x), valid
