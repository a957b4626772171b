"""Qwen3-VL: Qwen2-VL's layout with a Qwen3 decoder (RMSNorm on queries and keys, no qkv bias), interleaved
M-RoPE, and a vision tower with learned position embeddings resampled to each image's grid whose selected
layers also feed the first decoder layers ("deepstack").

Only what differs from Qwen2-VL lives here. Deepstack features travel as extra channels of the prompt
embedding, ``[merged features, deepstack 0, deepstack 1, ...]`` at image tokens and ``[token embedding, 0, ...]``
elsewhere, so every runtime path that slices or pads a prompt along the sequence (chunked prefill, prompt
cache, batching) carries them unchanged; ``hidden_states`` splits them off again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import from_dict, text_section
from ..nn.decoder import DecoderConfig, LayerTaps, no_attention_groups
from ..nn.layers import activation
from ..nn.rope import inverse_frequencies
from ..nn.vision import VisionBlock, segment_mask
from . import qwen2_vl


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepstack_visual_indexes", tuple(self.deepstack_visual_indexes))

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))


class FeedForward(nn.Module):
    """linear_fc2(act(linear_fc1(x))), the names of the tower's MLPs and mergers."""

    def __init__(self, dim: int, hidden: int, out: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, out)
        self._act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self._act(self.linear_fc1(x)))


class PatchMerger(FeedForward):
    """Each merge group's features concatenated, then projected to the text width. The main merger norms each
    patch before concatenating; the deepstack mergers norm the concatenation ("post-shuffle")."""

    def __init__(self, c: VisionConfig, postshuffle_norm: bool) -> None:
        merged = c.hidden_size * c.spatial_merge_size**2
        super().__init__(merged, merged, c.out_hidden_size, "gelu")
        self.merged_width = merged
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(merged if postshuffle_norm else c.hidden_size, eps=1e-6)

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_width))
        else:
            x = self.norm(x).reshape(-1, self.merged_width)
        return super().__call__(x)


def interpolation_taps(grid_thw: np.ndarray, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align-corners) resampling of a ``side`` x ``side`` learned position table to each image's grid:
    for every patch, in the processor's order, four indices into the flattened table and their weights."""
    positions = qwen2_vl.vision_position_ids(grid_thw, merge)
    sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grid_thw])
    # float32 throughout, as in the reference, so the weights agree to the last bit.
    src = positions.astype(np.float32) * np.float32(side - 1) / np.maximum(sizes - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[..., None] + offsets, 0, side - 1)  # (n, 2 axes, 2 taps)
    weights = np.clip(1 - np.abs(src[..., None] - floor[..., None] - offsets.astype(np.float32)), 0, None)
    indices = (taps[:, 0, :, None] * side + taps[:, 1, None, :]).reshape(-1, 4)
    products = (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(-1, 4)
    return indices, products.astype(np.float32)


class VisionTransformer(nn.Module):
    """Returns, per merged token, the merger's output followed by each deepstack merger's (concatenated)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = qwen2_vl.PatchEmbed(c, bias=True)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = [
            VisionBlock(
                c.hidden_size,
                c.num_heads,
                FeedForward(c.hidden_size, c.intermediate_size, c.hidden_size, c.hidden_act),
                norm=lambda: nn.LayerNorm(c.hidden_size, eps=1e-6),
            )
            for _ in range(c.depth)
        ]
        self.make_mergers(c)
        self._inv_freq = inverse_frequencies(c.hidden_size // c.num_heads // 2, c.rope_theta)
        self._side = int(c.num_position_embeddings**0.5)

    def make_mergers(self, c: VisionConfig) -> None:
        self.merger = PatchMerger(c, postshuffle_norm=False)
        self.deepstack_merger_list = [PatchMerger(c, postshuffle_norm=True) for _ in c.deepstack_visual_indexes]

    @property
    def deepstack_mergers(self) -> list[nn.Module]:
        return self.deepstack_merger_list

    @property
    def dtype(self) -> mx.Dtype:
        return self.merger.norm.weight.dtype

    def position_embeddings(self, grid_thw: np.ndarray) -> mx.array:
        indices, weights = interpolation_taps(grid_thw, self.config.spatial_merge_size, self._side)
        taps = self.pos_embed(mx.array(indices))  # (n, 4, hidden)
        return (taps * mx.array(weights)[..., None].astype(taps.dtype)).sum(axis=1)

    def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray) -> mx.array:
        c = self.config
        x = self.patch_embed(pixel_values.astype(self.dtype)) + self.position_embeddings(grid_thw)
        cos, sin = qwen2_vl.vision_rotary(qwen2_vl.vision_position_ids(grid_thw, c.spatial_merge_size), self._inv_freq)
        mask = segment_mask(qwen2_vl.frame_boundaries(grid_thw))
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask)
            if i in c.deepstack_visual_indexes:
                deepstack.append(self.deepstack_mergers[c.deepstack_visual_indexes.index(i)](x))
        return mx.concatenate([self.merger(x), *deepstack], axis=-1)


class Model(qwen2_vl.Model):
    vision_config_class = VisionConfig
    vision_tower = VisionTransformer

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        base = qwen2_vl.ModelConfig.from_hf(config, cls.vision_config_class)
        # M-RoPE is always interleaved here, as in transformers, whatever "mrope_interleaved" says.
        return cls(dataclasses.replace(base, text=cls.text_config(config), mrope_interleaved=True))

    @classmethod
    def text_config(cls, config: Mapping[str, Any]) -> DecoderConfig:
        # Qwen3: queries and keys are RMS-normed per head, and q/k/v carry no bias unless the config says so.
        return from_dict(DecoderConfig, text_section(config), qk_norm=True)

    def video_position_grids(
        self, video_grid: np.ndarray, second_per_grid_ts: mx.array | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Each frame is a run of its own (the prompt puts a timestamp between frames): one (1, h, w) grid per
        temporal patch."""
        frames = np.repeat(video_grid, video_grid[:, 0], axis=0)
        frames[:, 0] = 1
        return frames, None

    @property
    def deepstack_levels(self) -> int:
        return len(self.config.vision.deepstack_visual_indexes)

    def prompt_token_embeddings(self, input_ids: mx.array) -> mx.array:
        embeds = self.embed_tokens(input_ids)
        return mx.pad(embeds, [(0, 0), (0, 0), (0, embeds.shape[-1] * self.deepstack_levels)])

    def _decode(
        self,
        inputs_embeds: mx.array,
        cache: list[Any] | None,
        position_ids: mx.array | None,
        attention_mask: mx.array | None,
        attention_groups: mx.array | None,
        taps: LayerTaps | None,
    ) -> mx.array:
        """Prompt embeddings carry the deepstack channels (added after the first layers); decode steps' do not."""
        no_attention_groups(attention_groups)
        hidden = self.config.text.hidden_size
        levels = inputs_embeds.shape[-1] // hidden - 1
        parts = mx.split(inputs_embeds, levels + 1, axis=-1) if levels else [inputs_embeds]
        return self.model.language_model(
            parts[0],
            cache=cache,
            position_ids=position_ids,
            attention_mask=attention_mask,
            layer_additions=parts[1:],
            taps=taps,
        )
