"""The SigLIP vision tower (Gemma 3, PaliGemma, Idefics3/SmolVLM): a plain ViT with learned position
embeddings, pre-norm blocks and a final LayerNorm. Module names follow the transformers 5 weights
(``vision_tower.embeddings``, ``.encoder``, ``.post_layernorm``; published checkpoints put ``vision_model.`` in
between). The optional attention-pooling head is not used by these models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn

from ..config import from_dict
from .vit import EncoderLayer

__all__ = ["SiglipVisionConfig", "SiglipVisionModel"]


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
    def from_hf(cls, vision: Mapping[str, Any]) -> "SiglipVisionConfig":
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


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        # MLX convolutions are channels-last: the weight is (out, kh, kw, in).
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(images, C, H, W) as the processors give them -> (images, patches, hidden), patches row-major."""
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        # Called, not indexed: a quantized checkpoint stores the table packed.
        return patches + self.position_embedding(mx.arange(patches.shape[1]))


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

    def __call__(self, pixel_values: mx.array) -> mx.array:
        side = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, side, side):
            raise ValueError(
                f"pixel_values must be (images, {self.config.num_channels}, {side}, {side}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values.astype(self.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
