"""The Pixtral vision encoder (Pixtral-12B, Mistral 3): images at their own sizes, patches of all images in one
sequence with attention kept inside each image, 2D axial rotary positions, RMSNorm pre-norm blocks with a gated
MLP, and no class token or learned positions.

Module names follow the transformers ``PixtralVisionModel`` weight names (``patch_conv``, ``ln_pre``,
``transformer.layers.*.{attention_norm,attention,ffn_norm,feed_forward}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, from_dict
from .layers import Attention, GatedMLP
from .rope import AxialRotary, Rotate
from .vit import selected_hidden_states

__all__ = ["PixtralVisionConfig", "PixtralVisionTower"]

NORM_EPS = 1e-5  # fixed in the reference, not a config value


@dataclass(frozen=True)
class PixtralVisionConfig:
    # transformers' PixtralVisionConfig defaults: published configs leave out the values that equal them.
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vision: Mapping[str, Any]) -> "PixtralVisionConfig":
        rope = dict(vision.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", "axial")
        if rope_type not in ("axial", "default"):
            raise ConfigError(f"vision_config rope type {rope_type!r} is not supported (Pixtral's is axial)")
        theta = rope.get("rope_theta", vision.get("rope_theta", cls.rope_theta))
        config = from_dict(cls, vision, rope_theta=float(theta))
        if (config.hidden_size // config.num_attention_heads) % 4:
            raise ConfigError("vision head size must be a multiple of 4 for the 2D rotary (row and column halves)")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class PixtralLayer(nn.Module):
    """x + attention(norm(x)), then + gated MLP(norm(x))."""

    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        heads = c.num_attention_heads
        self.attention_norm = nn.RMSNorm(c.hidden_size, eps=NORM_EPS)
        self.attention = Attention(c.hidden_size, heads, heads, c.head_dim, qkv_bias=False)
        self.ffn_norm = nn.RMSNorm(c.hidden_size, eps=NORM_EPS)
        self.feed_forward = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def __call__(self, x: mx.array, rotate: Rotate, mask: mx.array | None) -> mx.array:
        x = x + self.attention(self.attention_norm(x), rotate, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, c: PixtralVisionConfig) -> None:
        super().__init__()
        self.layers = [PixtralLayer(c) for _ in range(c.num_hidden_layers)]


class PixtralVisionTower(nn.Module):
    def __init__(self, config: PixtralVisionConfig) -> None:
        super().__init__()
        c = self.config = config
        # MLX convolutions are channels-last: weight (out, kh, kw, in), input (batch, h, w, in).
        self.patch_conv = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.ln_pre = nn.RMSNorm(c.hidden_size, eps=NORM_EPS)
        self.transformer = Transformer(c)
        self._rotary = AxialRotary(c.head_dim, c.rope_theta)

    @property
    def dtype(self) -> mx.Dtype:
        return self.ln_pre.weight.dtype

    def patch_grids(self, pixel_values: mx.array, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Patch rows and columns of each image; its pixels sit top-left in ``pixel_values``, the rest padding."""
        p = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        if pixel_values.ndim != 4 or pixel_values.shape[0] != len(image_sizes):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not match {len(image_sizes)} image_sizes"
            )
        for h, w in image_sizes:
            if not (0 < h <= height and 0 < w <= width) or h % p or w % p:
                raise ValueError(
                    f"image size {h}x{w} does not fit pixel_values of {height}x{width} in whole {p}-pixel patches"
                )
        return [(h // p, w // p) for h, w in image_sizes]

    def __call__(
        self, pixel_values: mx.array, image_sizes: Sequence[tuple[int, int]], layers: Sequence[int] = (-1,)
    ) -> list[mx.array]:
        """Per image, (rows * cols, dim * len(layers)) hidden states of ``layers`` (indices as transformers'
        ``hidden_states``), its patches in row-major order."""
        grids = self.patch_grids(pixel_values, image_sizes)
        patches = self.patch_conv(pixel_values.astype(self.dtype).transpose(0, 2, 3, 1))
        dim = patches.shape[-1]
        flat = mx.concatenate([patches[i, :rows, :cols].reshape(-1, dim) for i, (rows, cols) in enumerate(grids)])
        counts = [rows * cols for rows, cols in grids]
        row_ids = np.concatenate([np.repeat(np.arange(rows), cols) for rows, cols in grids])
        col_ids = np.concatenate([np.tile(np.arange(cols), rows) for rows, cols in grids])
        rotate = self._rotary.at_grid(mx.array(row_ids), mx.array(col_ids))
        mask = None
        if len(grids) > 1:
            image_of = np.repeat(np.arange(len(grids)), counts)
            mask = mx.array(image_of[:, None] == image_of[None, :])  # block-diagonal: each image sees itself
        blocks = [lambda x, layer=layer: layer(x, rotate, mask) for layer in self.transformer.layers]
        hidden = selected_hidden_states(self.ln_pre(flat[None]), blocks, layers)[0]
        bounds = np.cumsum([0, *counts]).tolist()
        return [hidden[a:b] for a, b in zip(bounds, bounds[1:])]
