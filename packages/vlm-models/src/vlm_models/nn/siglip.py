"""The SigLIP vision tower (Gemma 3, PaliGemma, Idefics3/SmolVLM): a plain ViT with learned position
embeddings, pre-norm blocks and a final LayerNorm. Idefics3's variant takes a patch mask: padding patches are
hidden from attention and the real ones spread over the whole position grid (``navit_position_ids``). Module
names follow the transformers 5 weights (``vision_tower.embeddings``, ``.encoder``, ``.post_layernorm``;
published checkpoints put ``vision_model.`` in between). The optional attention-pooling head is not used by these
models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import from_dict
from .vit import EncoderLayer

__all__ = ["SiglipVisionConfig", "SiglipVisionModel", "navit_position_ids"]


@dataclass(frozen=True)
class SiglipVisionConfig:
    # transformers' defaults: published configs leave some of them out (PaliGemma 2's image_size, for one).
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_hf(cls, vision: Mapping[str, Any]) -> SiglipVisionConfig:
        return from_dict(cls, vision)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipEncoder(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = [
            EncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps)
            for _ in range(c.num_hidden_layers)
        ]


def navit_position_ids(patch_mask: np.ndarray, patches_per_side: int) -> np.ndarray:
    """(images, rows, cols) boolean patch masks (each image's real patches a top-left rectangle) -> (images,
    rows * cols) position ids: real patch i of r along an axis lands in bucket floor(i * side / r) of the full
    grid, so a smaller image spreads over all positions; padding patches take position 0.

    Exact integer arithmetic: the reference buckets float32 coordinates against float32 boundaries, which agrees
    with this for every rectangle on the grids the published checkpoints use (26, 27, 32 patches a side) but
    can land a bucket low on some other sizes (19, 25, 29, 31, ... a side, even for a full grid)."""
    side = patches_per_side
    images, rows, cols = patch_mask.shape
    real_rows = patch_mask[:, :, 0].sum(axis=1, keepdims=True)
    real_cols = patch_mask[:, 0, :].sum(axis=1, keepdims=True)
    row_ids = np.arange(rows)[None] * side // np.maximum(real_rows, 1)
    col_ids = np.arange(cols)[None] * side // np.maximum(real_cols, 1)
    ids = (row_ids[:, :, None] * side + col_ids[:, None, :]).reshape(images, -1)
    return np.where(patch_mask.reshape(images, -1), ids, 0).astype(np.int32)


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        # MLX convolutions are channels-last: the weight is (out, kh, kw, in).
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)
        self.patches_per_side = c.patches_per_side

    def __call__(self, pixel_values: mx.array, patch_mask: np.ndarray | None = None) -> mx.array:
        """(images, C, H, W) as the processors give them -> (images, patches, hidden), patches row-major."""
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        if patch_mask is None:
            positions = mx.arange(patches.shape[1])
        else:
            positions = mx.array(navit_position_ids(patch_mask, self.patches_per_side))
        # Called, not indexed: a quantized checkpoint stores the table packed.
        return patches + self.position_embedding(positions)


class SiglipVisionModel(nn.Module):
    """``vision_tower``: pixels (images, C, H, W) at the configured size -> (images, patches, hidden)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        return self.post_layernorm.weight.dtype

    def __call__(self, pixel_values: mx.array, patch_mask: np.ndarray | None = None) -> mx.array:
        """``patch_mask`` (images, rows, cols) marks the patches holding image; None means all of them."""
        side = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, side, side):
            raise ValueError(
                f"pixel_values must be (images, {self.config.num_channels}, {side}, {side}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values.astype(self.dtype), patch_mask)
        mask = None
        if patch_mask is not None and not patch_mask.all():
            keys = mx.array(patch_mask.reshape(patch_mask.shape[0], 1, 1, -1))
            mask = mx.where(keys, mx.array(0.0, x.dtype), mx.array(mx.finfo(x.dtype).min, x.dtype))
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)
