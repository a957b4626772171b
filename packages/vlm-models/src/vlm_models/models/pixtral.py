"""Pixtral (``llava`` checkpoints whose vision_config is ``pixtral``, e.g. mistral-community/pixtral-12b): LLaVA
with the Pixtral vision encoder. Images keep their own sizes (``image_sizes`` says which part of the padded
``pixel_values`` each one is); every patch becomes one token, each patch row closed by ``[IMG_BREAK]`` and the
image by ``[IMG_END]`` (the processor writes those; they are ordinary embeddings here).

Only what differs from LLaVA 1.5 lives here: the tower, per-image sizes, and how images are padded together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError
from ..nn.pixtral import PixtralVisionConfig, PixtralVisionTower
from . import llava

__all__ = ["Model", "processor_defaults"]


def parse_config(config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> llava.ModelConfig:
    """LLaVA's config with the Pixtral tower's; ``defaults`` fill what the config leaves out."""
    config = {**(defaults or {}), **config}
    if not config.get("text_config"):
        raise ConfigError("config.json has no text_config: a Pixtral vision encoder alone is no vision-language model")
    vision = PixtralVisionConfig.from_hf(config.get("vision_config") or {})
    parsed = llava.ModelConfig.from_hf(config, vision=vision)
    if parsed.vision_feature_select_strategy != "full":
        raise ConfigError("Pixtral towers have no class token: vision_feature_select_strategy must be 'full'")
    return parsed


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the token layout follows from the model: the patch size and the spatial merge."""
    vision = config.get("vision_config") or {}
    return {
        "patch_size": int(vision.get("patch_size", PixtralVisionConfig.patch_size)),
        "spatial_merge_size": int(config.get("spatial_merge_size", 1)),
    }


class Model(llava.Model):
    image_input_names = ("image_sizes",)
    processor_defaults = staticmethod(processor_defaults)

    @staticmethod
    def make_inner(config: llava.ModelConfig) -> llava.LlavaModel:
        return llava.LlavaModel(config, vision_tower=PixtralVisionTower(config.vision))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(parse_config(config))

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.vision_tower.patch_conv

    @staticmethod
    def _sizes(image_sizes: mx.array | None) -> list[tuple[int, int]]:
        if image_sizes is None:
            raise ValueError("Pixtral needs image_sizes with pixel_values (the processor gives both)")
        sizes = np.asarray(image_sizes).astype(np.int64).reshape(-1, 2)
        return [(int(h), int(w)) for h, w in sizes]

    def project(self, features: mx.array, grid: tuple[int, int]) -> mx.array:
        """One image's (rows * cols, dim) tower output -> its tokens' embeddings."""
        return self.model.multi_modal_projector(features)

    def image_features(self, pixel_values: mx.array, image_sizes: mx.array | None = None, **_: Any) -> list[mx.array]:
        tower = self.model.vision_tower
        sizes = self._sizes(image_sizes)
        grids = tower.patch_grids(pixel_values, sizes)
        per_image = tower(pixel_values, sizes, self.config.vision_feature_layers)
        return [self.project(features, grid) for features, grid in zip(per_image, grids)]

    def image_pixels(self, pixel_values: mx.array, image_sizes: mx.array | None = None, **_: Any) -> list[mx.array]:
        """Each image's own pixels, without the padding that batched it with larger ones."""
        sizes = self._sizes(image_sizes)
        self.model.vision_tower.patch_grids(pixel_values, sizes)  # validates
        return [pixel_values[i : i + 1, :, :h, :w] for i, (h, w) in enumerate(sizes)]

    def batch_pixels(self, pixels: list[mx.array]) -> mx.array:
        """Zero-pad to the largest height and width, bottom and right, as the processor does."""
        height, width = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
        pad = [((0, 0), (0, 0), (0, height - p.shape[-2]), (0, width - p.shape[-1])) for p in pixels]
        return mx.concatenate([mx.pad(p, widths) for p, widths in zip(pixels, pad)])
