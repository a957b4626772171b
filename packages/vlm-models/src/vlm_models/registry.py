"""model_type -> architecture. Adding a family is one entry here plus its module."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "VISION_VARIANTS",
    "architecture_for",
    "architecture_of",
    "UnsupportedModelError",
]


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    module: str
    """Module under vlm_models.models holding ``Model``."""
    image_processor: str | None
    """``module:Class`` of the numpy image processor; None for a family that does not see (Qwen2-Audio)."""
    image_token: str = "<|image_pad|>"
    default_chat_template: str | None = None
    """For families published without a chat template: how a user message becomes a prompt."""
    video_processor: str | None = None
    """``module:Class`` of the numpy video processor, for families that take video."""
    video_token: str | None = None
    video_chat_template: str | None = None
    """The template transformers' processor applies in place of the checkpoint's to conversations with a video."""
    audio_processor: str | None = None
    """``module:Class`` of the numpy audio feature extractor, for families that hear."""
    audio_token: str | None = None
    thinking_markers: tuple[str, str] = ("<think>", "</think>")
    """(start, end) of the thinking block the family's models write."""

    def load_module(self) -> ModuleType:
        return importlib.import_module(f"vlm_models.models.{self.module}")

    def image_processor_class(self) -> type | None:
        return None if self.image_processor is None else _processor_class(self.image_processor)

    def video_processor_class(self) -> type | None:
        return None if self.video_processor is None else _processor_class(self.video_processor)

    def audio_processor_class(self) -> type | None:
        return None if self.audio_processor is None else _processor_class(self.audio_processor)


def _processor_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"vlm_models.processors.{module}"), name)


# PaliGemma's checkpoints have no chat template: its prompt is the images' slots then the task text ("caption en");
# the processor adds <bos> and the closing newline.
_IMAGES_THEN_TEXT = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# SmolVLM's processor formats a conversation with a video by a template of its own (the published checkpoints'
# templates predate video): "<|im_start|>User: ...<end_of_utterance>\nAssistant:", with no space after the colon
# when a message opens with an image.
_SMOLVLM_VIDEO_TEMPLATE = (
    "{{- '<|im_start|>' -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}{{- ':' if message['content'][0]['type'] == 'image' else ': ' -}}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'video') -%}{{- '<' ~ part['type'] ~ '>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

# Qwen2.5-Omni as published (the thinker beside the talker), or its thinker saved alone.
_QWEN2_5_OMNI = Architecture(
    "qwen2_5_omni",
    "qwen2_vl:Qwen2VLImageProcessor",
    image_token="<|IMAGE|>",
    video_processor="qwen2_5_omni:Qwen2_5OmniVideoProcessor",
    video_token="<|VIDEO|>",
    audio_processor="qwen2_audio:Qwen2AudioFeatureExtractor",
    audio_token="<|AUDIO|>",
)

# Qwen3-Omni-MoE as published (the thinker beside the talker and code2wav), or its thinker saved alone.
_QWEN3_OMNI_MOE = Architecture(
    "qwen3_omni_moe",
    "qwen2_vl:Qwen2VLImageProcessor",
    video_processor="qwen3_omni_moe:Qwen3OmniMoeVideoProcessor",
    video_token="<|video_pad|>",
    audio_processor="qwen3_omni_moe:Qwen3OmniMoeFeatureExtractor",
    audio_token="<|audio_pad|>",
)

ARCHITECTURES: dict[str, Architecture] = {
    "qwen2_vl": Architecture(
        "qwen2_vl",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen2_vl:Qwen2VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    "qwen2_5_vl": Architecture(
        "qwen2_5_vl",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen2_vl:Qwen2_5_VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    "qwen3_vl": Architecture(
        "qwen3_vl",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen3_vl:Qwen3VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    "qwen3_vl_moe": Architecture(
        "qwen3_vl_moe",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen3_vl:Qwen3VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    "qwen3_5": Architecture(
        "qwen3_5",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen3_vl:Qwen3VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    "qwen3_5_moe": Architecture(
        "qwen3_5_moe",
        "qwen2_vl:Qwen2VLImageProcessor",
        video_processor="qwen3_vl:Qwen3VLVideoProcessor",
        video_token="<|video_pad|>",
    ),
    # Text-only checkpoints (Qwen3_5ForCausalLM): the decoder alone, dense or sparse.
    "qwen3_5_text": Architecture("qwen3_5_text", "qwen2_vl:Qwen2VLImageProcessor"),
    "qwen3_5_moe_text": Architecture("qwen3_5_text", "qwen2_vl:Qwen2VLImageProcessor"),
    "qwen2_audio": Architecture(
        "qwen2_audio",
        None,
        audio_processor="qwen2_audio:Qwen2AudioFeatureExtractor",
        audio_token="<|AUDIO|>",
    ),
    "qwen2_5_omni": _QWEN2_5_OMNI,
    "qwen2_5_omni_thinker": _QWEN2_5_OMNI,
    "qwen3_omni_moe": _QWEN3_OMNI_MOE,
    "qwen3_omni_moe_thinker": _QWEN3_OMNI_MOE,
    "llava": Architecture("llava", "clip:CLIPImageProcessor", image_token="<image>"),
    "llava_next": Architecture("llava_next", "clip:LlavaNextImageProcessor", image_token="<image>"),
    "gemma3": Architecture("gemma3", "gemma3:Gemma3ImageProcessor", image_token="<start_of_image>"),
    "gemma4": Architecture(
        "gemma4",
        "gemma4:Gemma4ImageProcessor",
        image_token="<|image|>",
        audio_processor="gemma4:Gemma4AudioFeatureExtractor",
        audio_token="<|audio|>",
        # Thinking (``<|think|>`` in the system turn) comes back as ``<|channel>thought\n...<channel|>``.
        thinking_markers=("<|channel>", "<channel|>"),
    ),
    # No vision or audio tower: raw patches and waveform frames are projected straight into the decoder.
    "gemma4_unified": Architecture(
        "gemma4_unified",
        "gemma4_unified:Gemma4UnifiedImageProcessor",
        image_token="<|image|>",
        audio_processor="gemma4_unified:Gemma4UnifiedAudioFeatureExtractor",
        audio_token="<|audio|>",
        thinking_markers=("<|channel>", "<channel|>"),
    ),
    "gemma3n": Architecture(
        "gemma3n",
        "gemma3n:Gemma3nImageProcessor",
        image_token="<image_soft_token>",
        audio_processor="gemma3n:Gemma3nAudioFeatureExtractor",
        audio_token="<audio_soft_token>",
    ),
    "idefics3": Architecture("idefics3", "idefics3:Idefics3ImageProcessor", image_token="<image>"),
    "smolvlm": Architecture(
        "smolvlm",
        "idefics3:Idefics3ImageProcessor",
        image_token="<image>",
        video_processor="smolvlm:SmolVLMVideoProcessor",
        video_token="<video>",
        video_chat_template=_SMOLVLM_VIDEO_TEMPLATE,
    ),
    "mistral3": Architecture("mistral3", "pixtral:PixtralImageProcessor", image_token="[IMG]"),
    # mlx-vlm's conversions of Pixtral-12B name the whole model "pixtral" (transformers keeps "llava", below).
    "pixtral": Architecture("pixtral", "pixtral:PixtralImageProcessor", image_token="[IMG]"),
    "paligemma": Architecture(
        "paligemma", "paligemma:PaliGemmaImageProcessor", image_token="<image>", default_chat_template=_IMAGES_THEN_TEXT
    ),
}


VISION_VARIANTS: dict[tuple[str, str], Architecture] = {
    # (model_type, vision_config.model_type): one model_type whose checkpoints carry another vision tower
    ("llava", "pixtral"): Architecture("pixtral", "pixtral:PixtralImageProcessor", image_token="[IMG]"),
}


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    """The architecture of a config.json: by model_type, or by its vision tower where that varies."""
    vision = config.get("vision_config")
    vision_type = vision.get("model_type") if isinstance(vision, Mapping) else None
    variant = VISION_VARIANTS.get((config.get("model_type") or "", vision_type or ""))
    return variant or architecture_for(config.get("model_type"))


def architecture_for(model_type: str | None) -> Architecture:
    try:
        return ARCHITECTURES[model_type or ""]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} in config.json (supported: {supported})"
        ) from None
