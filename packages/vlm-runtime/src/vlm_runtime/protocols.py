"""What the runtime needs from a model and a processor. Any architecture that provides these can be generated
from; the runtime never imports a model package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .cache import Cache

__all__ = ["ExposesLayers", "PromptEmbedding", "GenerativeModel", "PromptProcessor"]


@dataclass
class PromptEmbedding:
    """A prompt turned into decoder inputs: (batch, length, hidden) embeddings, and position ids whose last axis
    is the sequence (None where positions simply follow the cache)."""

    inputs_embeds: mx.array
    position_ids: mx.array | None = None
    attention_mask: mx.array | None = None
    attention_groups: mx.array | None = None
    """(batch, length) ints: tokens sharing an id >= 0 attend to each other both ways (an image in Gemma 3, the
    prefix in PaliGemma); -1 is plain causal. Models that set it take it as ``hidden_states``' keyword."""


class GenerativeModel(Protocol):
    def make_cache(self) -> list[Cache]: ...

    def embed_prompt(self, *, vision_cache: Any = None, **inputs: mx.array) -> PromptEmbedding:
        """Token embeddings with any media features merged in; the vision tower runs here. ``inputs`` are the
        processor's (``input_ids``, ``pixel_values``, ...); ``vision_cache`` (a ``VisionFeatureCache``, or
        None) lets images seen before skip the tower."""
        ...

    def embed_tokens(self, input_ids: mx.array) -> mx.array: ...

    def hidden_states(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Cache],
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> mx.array:
        """Run the decoder over embeddings, extending ``cache``; returns final hidden states.
        ``attention_groups``: ``PromptEmbedding.attention_groups`` (None for models without such spans)."""
        ...

    def compute_logits(self, hidden: mx.array) -> mx.array: ...


@runtime_checkable
class ExposesLayers(Protocol):
    """A model whose decoder hands out the hidden states entering chosen layers: drafters that read the target's
    features (EAGLE-3) need it."""

    def hidden_states_and_layers(
        self,
        inputs_embeds: mx.array,
        *,
        cache: list[Cache],
        layers: Sequence[int],
        position_ids: mx.array | None = None,
        attention_mask: mx.array | None = None,
        attention_groups: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """``hidden_states``, and (batch, length, hidden * len(layers)): the hidden states entering each of
        ``layers`` (index ``num_layers``: the last layer's output, before the final norm), side by side."""
        ...


class PromptProcessor(Protocol):
    eos_token_ids: frozenset[int]
    thinking_markers: tuple[str, str]
    """(start, end) of the model's thinking block, e.g. ``("<think>", "</think>")``."""

    @property
    def supports_video(self) -> bool:
        """Whether ``prepare_inputs`` takes videos (the family has a video processor)."""
        ...

    def prepare_inputs(
        self,
        prompt: str,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        video_sampling: Any = None,
        audios: Sequence[Any] = (),
    ) -> dict[str, mx.array]:
        """Tokenize ``prompt`` (already chat-formatted) and preprocess ``images``, ``videos`` (sampled as
        ``video_sampling`` says) and ``audios`` into model inputs; a processor refuses media its family does
        not take."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens added (the thinking budget finds its markers with it)."""
        ...

    def decode(self, tokens: Sequence[int]) -> str: ...
