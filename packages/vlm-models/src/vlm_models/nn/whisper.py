"""Whisper's audio encoder, the audio tower of Qwen2-Audio (and, in variants, of Qwen2.5-Omni and Voxtral).

Log-mel frames (10 ms) go through two convolutions (the second strides by 2: 20 ms per position), learned
positions, pre-norm transformer layers whose attention skips the padding after each clip, then (Qwen2-Audio)
an average pool of 2 (40 ms per output) and a final norm. Module names follow transformers'
(``conv1``, ``embed_positions``, ``layers.N.self_attn.q_proj``, ``layers.N.fc1``, ``layer_norm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import from_dict
from .layers import activation

__all__ = [
    "WhisperEncoder",
    "WhisperEncoderConfig",
    "chunk_lengths",
    "conv1d_weight_to_mlx",
    "encoder_lengths",
    "sinusoid_positions",
]


@dataclass(frozen=True)
class WhisperEncoderConfig:
    # Qwen2-Audio's encoder defaults (Whisper large-v3's shape).
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    scale_embedding: bool = False

    @classmethod
    def from_hf(cls, audio: Mapping[str, Any]) -> WhisperEncoderConfig:
        return from_dict(cls, {k: v for k, v in audio.items() if v is not None})

    @property
    def input_frames(self) -> int:
        """The mel frames a clip must have: the conv stack halves them into the learned positions."""
        return self.max_source_positions * 2


def conv1d_weight_to_mlx(weight: mx.array, in_channels: int) -> mx.array:
    """Accept PyTorch's Conv1d layout (out, in, k) or MLX's (out, k, in); return MLX's."""
    if weight.ndim == 3 and weight.shape[1] == in_channels and weight.shape[-1] != in_channels:
        return weight.transpose(0, 2, 1)
    return weight


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> mx.array:
    """Fixed positions (the Qwen-Omni encoders'): sines then cosines of geometrically spaced frequencies (float32)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(np.float32(-increment) * np.arange(channels // 2, dtype=np.float32))
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return mx.array(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))


def chunk_lengths(frames: int, chunk: int) -> list[int]:
    """A clip of ``frames`` mel frames in chunks of ``chunk`` (the last one shorter): the Qwen-Omni encoders
    convolve each chunk on its own."""
    return [min(chunk, frames - start) for start in range(0, frames, chunk)]


def encoder_lengths(frames: mx.array) -> tuple[mx.array, mx.array]:
    """Per clip, from its real mel frames: positions after the strided convolution, and outputs after the pool."""
    after_conv = (frames - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


def conv1d_k3(conv: nn.Conv1d, x: mx.array, stride: int) -> mx.array:
    """``conv(x)`` for a kernel-3, padding-1 convolution, as one matrix product over the three shifted copies of
    ``x`` (N, L, C): the same sums, but through the BLAS product where MLX's CPU convolution is slow (about 1
    GFLOP/s; a 30 s window's two convolutions took seconds)."""
    length = x.shape[1]
    padded = mx.pad(x, [(0, 0), (1, 1), (0, 0)])
    out_length = (length - 1) // stride + 1
    taps = [padded[:, k : k + stride * (out_length - 1) + 1 : stride] for k in range(3)]
    weight = conv.weight.reshape(conv.weight.shape[0], -1)  # (out, 3 * in), MLX's (out, k, in) order
    y = mx.concatenate(taps, axis=-1) @ weight.T
    return y + conv.bias if "bias" in conv else y


class EncoderAttention(nn.Module):
    """Bidirectional attention; the key projection has no bias (Whisper's) unless ``key_bias`` (Qwen3-Omni's)."""

    def __init__(self, dim: int, heads: int, key_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        b, n, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        # The queries are scaled before the product, as the reference does (it rounds differently otherwise).
        q = heads(self.q_proj(x) * self.head_dim**-0.5)
        out = mx.fast.scaled_dot_product_attention(
            q, heads(self.k_proj(x)), heads(self.v_proj(x)), scale=1.0, mask=mask
        )
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, c: WhisperEncoderConfig, key_bias: bool = False) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(c.d_model, c.encoder_attention_heads, key_bias)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.encoder_ffn_dim)
        self.fc2 = nn.Linear(c.encoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self._act = activation(c.activation_function)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self._act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """(clips, mel bins, frames) log-mel features and each clip's real frame count -> (clips, frames / 4, d_model)
    pooled, normed states (Qwen2-Audio's tower)."""

    def __init__(self, config: WhisperEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.layers = [EncoderLayer(c) for _ in range(c.encoder_layers)]
        self.layer_norm = nn.LayerNorm(c.d_model)

    @property
    def dtype(self) -> mx.Dtype:
        return self.layer_norm.weight.dtype

    def __call__(self, input_features: mx.array, frames: mx.array) -> mx.array:
        c = self.config
        if input_features.shape[-1] != c.input_frames:
            raise ValueError(
                f"the audio tower takes {c.input_frames} mel frames per clip (padded), got {input_features.shape[-1]}"
            )
        x = nn.gelu(conv1d_k3(self.conv1, input_features.transpose(0, 2, 1).astype(self.dtype), 1))
        x = nn.gelu(conv1d_k3(self.conv2, x, 2))
        # Called, not read: a quantized checkpoint stores the table packed. (scale_embedding is unused, as in
        # the reference's encoder.)
        x = x + self.embed_positions(mx.arange(x.shape[1]))
        valid, _ = encoder_lengths(frames)
        # Keys past each clip's real audio are masked (the queries there still run, as in the reference).
        mask = (mx.arange(x.shape[1])[None, :] < valid[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        b, n, d = x.shape
        pooled = x[:, : n // 2 * 2].reshape(b, n // 2, 2, d).mean(axis=2)
        return self.layer_norm(pooled)
