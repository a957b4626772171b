"""What loading, conversion and training need from a family's ``Model`` class, beyond generation.

The runtime's ``GenerativeModel`` is what generation needs; ``FamilyModel`` adds the rest: building the model
from a Hugging Face config, mapping any checkpoint layout onto its names (``sanitize``) and back to the
MLX-community layout, the groups LoRA may adapt, and processor settings implied by the model config. Every
family's ``Model`` provides them all (``FamilyDefaults`` holds the common defaults), so the code that uses them
asks no ``getattr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import mlx.core as mx

from vlm_runtime import GenerativeModel

__all__ = ["DEFAULT_ADAPTER_GROUPS", "FamilyDefaults", "FamilyModel"]

DEFAULT_ADAPTER_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # Where each group of a model lives: Qwen's names, then LLaVA's, Pixtral's and Gemma's.
        "language": ("model.language_model.",),
        "vision": ("model.visual.", "model.vision_tower."),
        "projector": ("model.visual.merger.", "model.multi_modal_projector."),
    }
)


class FamilyModel(GenerativeModel, Protocol):
    adapter_groups: ClassVar[Mapping[str, tuple[str, ...]]]
    """LoRA target group -> the module path prefixes it covers ("language", "vision", "projector")."""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> FamilyModel:
        """The model (random weights) for a checkpoint's config.json, in any layout the family reads."""
        ...

    @staticmethod
    def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
        """Processor settings that follow from the model config, for processor files that leave them out."""
        ...

    @staticmethod
    def takes_audio(config: Mapping[str, Any]) -> bool:
        """Whether a checkpoint with this config hears (has an audio tower), for families that have one."""
        ...

    @staticmethod
    def keeps_float(path: str) -> str | None:
        """Why ``vlm convert -q`` must leave the layer at ``path`` float (an expert router, say), or None."""
        ...

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Any supported checkpoint layout's weights under this model's names. Pure and idempotent."""
        ...

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """This model's weights under the MLX-community layout's names (the inverse of ``sanitize``)."""
        ...


class FamilyDefaults:
    """What a family's ``Model`` inherits unless it says otherwise: the usual adapter groups, no processor
    settings implied by the config, every checkpoint hearing where the family has audio, no layer kept float."""

    adapter_groups: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_ADAPTER_GROUPS

    @staticmethod
    def processor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def takes_audio(config: Mapping[str, Any]) -> bool:
        return True  # a family hears where it has an audio processor at all

    @staticmethod
    def keeps_float(path: str) -> str | None:
        return None
