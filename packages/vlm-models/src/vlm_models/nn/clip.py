"""The CLIP vision transformer (LLaVA's vision tower): class token, learned positions, pre-norm encoder layers.

Module names follow the transformers 5 ``CLIPVisionModel`` weight names (``embeddings.*``, ``pre_layrnorm``,
``encoder.layers.*``, ``post_layernorm``). The tower returns the hidden states of the layers a family selects
rather than the pooled output, so layers past the deepest selected one never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .vit import EncoderLayer, selected_hidden_states

__all__ = ["CLIPVisionConfig", "CLIPVisionTower"]


@dataclass(frozen=True)
class CLIPVisionConfig:
    # transformers' CLIPVisionConfig defaults: published configs leave out the values that equal them.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        c = config
        self.class_embedding = mx.zeros((c.hidden_size,))
        # MLX convolutions are channels-last: weight (out, kh, kw, in), input (batch, h, w, in).
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.patches_per_side**2 + 1, c.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """``pixel_values``: (batch, channels, height, width), the processor's layout."""
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))
        batch, _, _, dim = patches.shape
        patches = patches.reshape(batch, -1, dim)
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (batch, 1, dim))
        # Looked up rather than read as a table, so a quantized embedding works too.
        positions = self.position_embedding(mx.arange(patches.shape[1] + 1))
        return mx.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTower(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = Encoder(c)
        # Unused by the families here (they take hidden states, not the pooled output) but in every checkpoint.
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        return self.pre_layrnorm.weight.dtype

    def check_image_size(self, height: int, width: int) -> None:
        size = self.config.image_size
        if (height, width) != (size, size):
            raise ValueError(f"the vision tower takes {size}x{size} images, got {height}x{width}")

    def __call__(self, pixel_values: mx.array, layers: Sequence[int]) -> mx.array:
        """Hidden states of ``layers`` (indices into [embeddings, layer 1, ..., layer N], negative from the end,
        as transformers' ``hidden_states``) concatenated on the feature axis: (batch, tokens, dim * len(layers))."""
        self.check_image_size(*pixel_values.shape[-2:])
        h = self.pre_layrnorm(self.embeddings(pixel_values.astype(self.dtype)))
        return selected_hidden_states(h, self.encoder.layers, layers)


class Encoder(nn.Module):
    def __init__(self, c: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = [
            EncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps)
            for _ in range(c.num_hidden_layers)
        ]
