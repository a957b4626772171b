"""LLaVA-NeXT (1.6): LLaVA 1.5 over AnyRes tiles. Each image is a global view plus the tiles of its best-fit grid
resolution; the tiles' features are stitched back into one grid, cropped to the image's own aspect (the letterbox
removed), and each row ends with the learned ``image_newline`` embedding.

Only what differs from LLaVA 1.5 lives here: the newline parameter and the packing of tile features.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import ConfigError
from ..processors.clip import select_best_resolution, unpadded_grid
from . import llava
from .llava import processor_defaults

__all__ = ["Model", "processor_defaults"]


class LlavaNextModel(llava.LlavaModel):
    def __init__(self, config: llava.ModelConfig) -> None:
        super().__init__(config)
        self.image_newline = mx.zeros((config.text.hidden_size,))


class Model(llava.Model):
    image_input_names = ("image_sizes",)

    @staticmethod
    def make_inner(config: llava.ModelConfig) -> LlavaNextModel:
        return LlavaNextModel(config)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        parsed = llava.ModelConfig.from_hf(config)
        if not parsed.image_grid_pinpoints:
            raise ConfigError("config.json lacks image_grid_pinpoints")
        if parsed.vision_feature_select_strategy != "default":
            raise ConfigError("LLaVA-NeXT stitches tiles without their class token: the strategy must be 'default'")
        return cls(parsed)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles per column and per row of the resolution an image of this size is tiled at."""
        best_h, best_w = select_best_resolution(height, width, self.config.image_grid_pinpoints)
        size = self.config.vision.image_size
        return best_h // size, best_w // size

    def _tile_counts(self, image_sizes: mx.array | None) -> tuple[list[list[int]], list[tuple[int, int]], list[int]]:
        """Per image: its (height, width), tile grid, and tile count (the global view included)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor gives both)")
        sizes = np.asarray(image_sizes).astype(np.int64).reshape(-1, 2).tolist()
        grids = [self._grid(h, w) for h, w in sizes]
        return sizes, grids, [1 + gh * gw for gh, gw in grids]

    def image_pixels(self, pixel_values: mx.array, image_sizes: mx.array | None = None, **_: Any) -> list[mx.array]:
        """``pixel_values``: (images, tiles, C, H, W), zero-padded on the tile axis, or (all real tiles, C, H, W);
        returns each image's real tiles."""
        sizes, _, counts = self._tile_counts(image_sizes)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"{pixel_values.shape[0]} images of pixels but {len(sizes)} image_sizes")
            if max(counts) > pixel_values.shape[1]:
                raise ValueError("pixel_values has fewer tiles than image_sizes implies")
            return [pixel_values[i, :n] for i, n in enumerate(counts)]
        if pixel_values.ndim == 4 and pixel_values.shape[0] == sum(counts):
            bounds = np.cumsum([0, *counts]).tolist()
            return [pixel_values[a:b] for a, b in itertools.pairwise(bounds)]
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not match image_sizes {sizes}")

    def image_features(self, pixel_values: mx.array, image_sizes: mx.array | None = None, **_: Any) -> list[mx.array]:
        sizes, grids, counts = self._tile_counts(image_sizes)
        features = self.tile_features(mx.concatenate(self.image_pixels(pixel_values, image_sizes)))
        out, start = [], 0
        for (height, width), grid, n in zip(sizes, grids, counts):
            out.append(self._pack(features[start : start + n], height, width, grid))
            start += n
        return out

    def _pack(self, features: mx.array, height: int, width: int, grid: tuple[int, int]) -> mx.array:
        """The global view's tokens, then the stitched, unpadded tile grid row by row, each row plus a newline."""
        side = self.config.vision.patches_per_side
        gh, gw = grid
        dim = features.shape[-1]
        stitched = features[1:].reshape(gh, gw, side, side, dim).transpose(0, 2, 1, 3, 4)
        stitched = stitched.reshape(gh * side, gw * side, dim)
        rows, cols = unpadded_grid(height, width, gh * side, gw * side)
        top, left = (gh * side - rows) // 2, (gw * side - cols) // 2
        kept = stitched[top : top + rows, left : left + cols]
        newline = mx.broadcast_to(self.model.image_newline.astype(kept.dtype), (rows, 1, dim))
        return mx.concatenate([features[0], mx.concatenate([kept, newline], axis=1).reshape(-1, dim)])
