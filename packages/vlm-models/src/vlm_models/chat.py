"""Chat formatting through the checkpoint's own template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx

from .inputs import Processor

__all__ = ["apply_chat_template", "prepare_inputs"]


def apply_chat_template(
    processor: Processor,
    config: Mapping[str, Any] | None,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    num_images: int = 0,
    num_videos: int = 0,
    num_audios: int = 0,
    system: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Format ``prompt`` (a user message, or a list of chat messages) for generation.

    For a single user message the media slots come first (images, videos, then audio clips), then the text, as the Qwen and
    most VLM templates expect. ``config`` is the model's config dict; kept for templates that depend on it.
    ``tools`` (OpenAI-style function definitions) go to templates that render them. A conversation with a video
    takes the family's video template where its processor has one (SmolVLM's).
    """
    if num_audios and not processor.supports_audio:
        raise ValueError("audio inputs are not supported by this model")
    if isinstance(prompt, str):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.extend({"type": "video"} for _ in range(num_videos))
        content.extend({"type": "audio"} for _ in range(num_audios))
        content.append({"type": "text", "text": prompt})
        messages: list[Mapping[str, Any]] = [{"role": "user", "content": content}]
    else:
        messages = list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
    template = processor.chat_template
    if getattr(processor, "video_chat_template", None) and _has_video(messages):
        template = processor.video_chat_template
    if template is None:
        raise ValueError("the checkpoint has no chat template; pass an already formatted prompt to generate")
    extra: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if tools:
        extra["tools"] = list(tools)
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, **extra
    )


def _has_video(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        isinstance(part, Mapping) and part.get("type") == "video"
        for message in messages
        if not isinstance(message.get("content"), str)
        for part in message.get("content") or ()
    )


def prepare_inputs(
    processor: Processor, prompt: str, images: Sequence[Any] = (), videos: Sequence[Any] = ()
) -> dict[str, mx.array]:
    """Tokenize a formatted prompt and preprocess its images and videos into the model's input tensors."""
    return processor.prepare_inputs(prompt, images, videos)
