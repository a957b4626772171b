"""Qwen2.5-VL: Qwen2-VL with an RMSNorm / gated-MLP vision tower that attends within windows in most blocks,
and video positions spaced by time.

Only what differs from Qwen2-VL lives here: the vision config, the blocks, the window ordering, and the temporal
position step of videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..nn.layers import GatedMLP
from ..nn.vision import VisionBlock, segment_mask
from . import qwen2_vl


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    tokens_per_second: float = 4
    """Temporal positions per second of video (transformers' default; the released checkpoints say 2)."""

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def out_size(self) -> int:
        return self.out_hidden_size


def window_order(grid_thw: np.ndarray, merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Group merged patches by window.

    Returns the merged-patch permutation that makes each ``window`` x ``window`` square of merged patches
    contiguous (row-major windows, per frame), and the boundaries of those windows in patch tokens.
    """
    order, boundaries, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        # Pad to whole windows with -1, then read the windows out one by one.
        nh, nw = -(-gh // window), -(-gw // window)
        padded = np.full((t, nh * window, nw * window), -1)
        padded[:, :gh, :gw] = index
        windows = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
        for cells in windows:
            cells = cells[cells >= 0]
            if len(cells):
                order.append(cells + base)
                boundaries.append(boundaries[-1] + len(cells) * merge * merge)
        base += t * gh * gw
    return np.concatenate(order), boundaries


class VisionTransformer(qwen2_vl.VisionTransformer):
    @staticmethod
    def norm(dim: int) -> nn.Module:
        return nn.RMSNorm(dim, eps=1e-6)

    @classmethod
    def make_block(cls, c: VisionConfig) -> VisionBlock:
        mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, bias=True)
        return VisionBlock(c.hidden_size, c.num_heads, mlp, norm=lambda: cls.norm(c.hidden_size))

    def __call__(self, pixel_values: mx.array, grid_thw: np.ndarray) -> mx.array:
        c = self.config
        group = c.spatial_merge_size**2
        window = c.window_size // c.spatial_merge_size // c.patch_size
        order, window_bounds = window_order(grid_thw, c.spatial_merge_size, window)
        # Reorder whole merge groups so every window is a contiguous run of tokens.
        token_order = (order[:, None] * group + np.arange(group)).reshape(-1)
        x = self.patch_embed(pixel_values.astype(self.dtype))[mx.array(token_order)]
        positions = qwen2_vl.vision_position_ids(grid_thw, c.spatial_merge_size)[token_order]
        cos, sin = self.rotary(positions)
        full = segment_mask(qwen2_vl.frame_boundaries(grid_thw))
        windowed = segment_mask(window_bounds)
        full_blocks = set(c.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in full_blocks else windowed)
        return self.merger(x)[mx.array(np.argsort(order))]


class Model(qwen2_vl.Model):
    vision_config_class = VisionConfig
    vision_tower = VisionTransformer

    def video_position_grids(
        self, video_grid: np.ndarray, second_per_grid_ts: mx.array | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Temporal patches are ``second_per_grid_ts * tokens_per_second`` positions apart (one second per
        patch without it, as in transformers), in float32 as the reference multiplies them."""
        seconds = np.ones(len(video_grid), np.float32)
        if second_per_grid_ts is not None:
            seconds = np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)
            if len(seconds) != len(video_grid):
                raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {len(video_grid)} video(s)")
        return video_grid, np.float32(self.config.vision.tokens_per_second) * seconds
