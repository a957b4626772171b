"""The Pixtral vision encoder (Pixtral-12B, Mistral 3): images at their own sizes, each attending only within
itself, 2D axial rotary positions over patch rows and columns, RMSNorm pre-norm blocks with a gated MLP, and no
class token or learned positions.

Module names follow the transformers ``PixtralVisionModel`` weight names (``patch_conv``, ``ln_pre``,
``transformer.layers.*.{attention_norm,attention,ffn_norm,feed_forward}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    def from_hf(cls, vision: Mapping[str, Any]) -> PixtralVisionConfig:
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

    def __call__(self, x: mx.array, rotate: Rotate, mask: Any) -> mx.array:
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
        ``hidden_states``), its patches in row-major order.

        transformers packs all images into one sequence under a block-diagonal mask; attention inside each block is
        all there is, so images of one grid run here as one batch and no mask (or its length-squared memory) exists.
        """
        grids = self.patch_grids(pixel_values, image_sizes)
        patches = self.patch_conv(pixel_values.astype(self.dtype).transpose(0, 2, 3, 1))
        dim = patches.shape[-1]
        out: list[mx.array] = [mx.array(0)] * len(grids)
        for rows, cols in dict.fromkeys(grids):  # each distinct grid once, in order
            members = [i for i, grid in enumerate(grids) if grid == (rows, cols)]
            x = mx.stack([patches[i, :rows, :cols].reshape(-1, dim) for i in members])
            rotate = self._rotary.at_grid(
                mx.array(np.repeat(np.arange(rows), cols)), mx.array(np.tile(np.arange(cols), rows))
            )
            blocks = [lambda h, layer=layer, rotate=rotate: layer(h, rotate, None) for layer in self.transformer.layers]
            hidden = selected_hidden_states(self.ln_pre(x), blocks, layers)
            for j, i in enumerate(members):
                out[i] = hidden[j]
        return out
