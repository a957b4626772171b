"""Mistral 3 (Mistral Small 3.1 / 3.2): the Pixtral vision encoder, then a projector that RMS-normalises the
patch features, merges each ``spatial_merge_size`` x ``spatial_merge_size`` block of patches into one token
(a learned linear map of the block's concatenated features), and maps them to the text width with LLaVA's
two-layer MLP; a Mistral decoder.

Only what differs from Pixtral-on-LLaVA (models/pixtral.py) lives here: the projector and its defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from ..nn.pixtral import PixtralVisionTower
from . import llava, pixtral

__all__ = ["Model", "ModelConfig", "processor_defaults"]

# Mistral3Config's defaults, which published configs may leave out.
DEFAULTS: dict[str, Any] = dict(
    image_token_index=10,
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    multimodal_projector_bias=False,
    spatial_merge_size=2,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class ModelConfig(llava.ModelConfig):
    spatial_merge_size: int = 2

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], vision: Any = None) -> ModelConfig:
        parsed = pixtral.parse_config(config, DEFAULTS)
        if len(parsed.vision_feature_layers) != 1:
            raise ConfigError("Mistral 3 normalises one vision layer's features: vision_feature_layer must be one int")
        merge = int({**DEFAULTS, **config}["spatial_merge_size"])
        if merge < 1:
            raise ConfigError(f"spatial_merge_size must be >= 1, got {merge}")
        fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)}
        return cls(**fields, spatial_merge_size=merge)


def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    return pixtral.processor_defaults({**DEFAULTS, **config})


class PatchMerger(nn.Module):
    """Each merge x merge block of a (rows, cols) patch grid -> one token: its features concatenated channel by
    channel (each channel's block row-major), as torch's ``unfold``, then a linear map back to ``dim``."""

    def __init__(self, dim: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def __call__(self, features: mx.array, grid: tuple[int, int]) -> mx.array:
        (rows, cols), m, dim = grid, self.merge, features.shape[-1]
        # Whole blocks only, as unfold: a trailing partial row or column of blocks is dropped.
        x = features.reshape(rows, cols, dim)[: rows - rows % m, : cols - cols % m]
        x = x.reshape(rows // m, m, cols // m, m, dim).transpose(0, 2, 4, 1, 3)
        return self.merging_layer(x.reshape(-1, dim * m * m))


class MultiModalProjector(llava.MultiModalProjector):
    """norm, patch merge, then LLaVA's linear_2(act(linear_1(x)))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__(c.vision.hidden_size, c.text.hidden_size, c.projector_hidden_act, c.projector_bias)
        self.norm = nn.RMSNorm(c.vision.hidden_size, eps=c.text.rms_norm_eps)
        self.patch_merger = PatchMerger(c.vision.hidden_size, c.spatial_merge_size)

    def __call__(self, features: mx.array, grid: tuple[int, int]) -> mx.array:  # type: ignore[override]
        return super().__call__(self.patch_merger(self.norm(features), grid))


class Model(pixtral.Model):
    config: ModelConfig
    processor_defaults = staticmethod(processor_defaults)

    @staticmethod
    def make_inner(config: ModelConfig) -> llava.LlavaModel:  # type: ignore[override]
        return llava.LlavaModel(
            config, vision_tower=PixtralVisionTower(config.vision), projector=MultiModalProjector(config)
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        return cls(ModelConfig.from_hf(config))

    def project(self, features: mx.array, grid: tuple[int, int]) -> mx.array:
        return self.model.multi_modal_projector(features, grid)
