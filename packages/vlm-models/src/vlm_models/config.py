"""Reading Hugging Face config dicts into typed dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["from_dict", "text_section", "ConfigError"]

T = TypeVar("T")


class ConfigError(ValueError):
    """config.json is missing something the architecture needs, or holds a value it cannot use."""


def from_dict(cls: type[T], values: Mapping[str, Any], **overrides: Any) -> T:
    """Build dataclass ``cls`` from ``values``, ignoring keys it does not declare (HF configs carry many)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def text_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's settings, whatever the layout.

    transformers 4 configs keep them at the top level; transformers 5 nests them under ``text_config``.
    Nested values win; top-level ones fill the gaps.
    """
    flat = {k: v for k, v in config.items() if not k.endswith("_config")}
    return {**flat, **(config.get("text_config") or {})}
