"""The typed front door: every generation option in one of four settings, validated once.

``generate``, ``stream_generate`` and ``batch_generate`` take a ``GenerationSettings`` (``settings=``) and, as
a shorthand, the familiar keyword options (``temperature=0.7, max_tokens=64``); the keywords are sorted into
the four settings here and nowhere else. An option's name is its field's name (the thinking ones carry a
``thinking_`` prefix), so a field added to a settings class is an option at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .cache_settings import CacheSettings
from .request import GenerationConfig, Request
from .sampling import LogitsProcessor, SamplingParams
from .thinking import ThinkingConfig

__all__ = ["GenerationSettings", "OPTION_NAMES", "generation_settings"]


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: sampling, length and stopping, the thinking budget, and the KV cache."""

    sampling: SamplingParams = SamplingParams()
    config: GenerationConfig = GenerationConfig()
    thinking: ThinkingConfig = ThinkingConfig()
    cache: CacheSettings = CacheSettings()

    def with_options(self, **options: Any) -> GenerationSettings:
        """These settings with some options changed; an unknown name is a TypeError, a bad value a ValueError."""
        if not options:
            return self
        changes: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if name not in _OPTIONS:
                known = ", ".join(sorted(_OPTIONS))
                raise TypeError(f"unknown generation option {name!r}; the options are: {known}")
            group, field = _OPTIONS[name]
            changes.setdefault(group, {})[field] = value
        return dataclasses.replace(
            self, **{group: dataclasses.replace(getattr(self, group), **fields) for group, fields in changes.items()}
        )

    def request(self, inputs: Mapping[str, Any], constraints: tuple[LogitsProcessor, ...] = ()) -> Request:
        """A request for ``inputs`` under these settings (the cache settings belong to whoever runs it)."""
        return Request(inputs, self.sampling, self.config, self.thinking, constraints)


_PREFIXES = {"sampling": "", "config": "", "thinking": "thinking_", "cache": ""}
_OPTIONS: dict[str, tuple[str, str]] = {
    prefix + field.name: (group, field.name)
    for group, prefix in _PREFIXES.items()
    for field in dataclasses.fields(GenerationSettings.__dataclass_fields__[group].default)
}
"""Keyword option -> (settings group, field)."""
OPTION_NAMES = frozenset(_OPTIONS)


def generation_settings(settings: GenerationSettings | None = None, /, **options: Any) -> GenerationSettings:
    """``settings`` (or the defaults) with the keyword ``options`` applied and validated: temperature, top_p,
    top_k, min_p, seed, repetition_penalty, repetition_context_size, presence_penalty, frequency_penalty,
    logit_bias; max_tokens, prefill_step_size, ignore_eos, stop, logprobs, top_logprobs; thinking_budget,
    thinking_start_token, thinking_end_token; max_kv_size, kv_bits, kv_group_size."""
    return (settings or GenerationSettings()).with_options(**options)
