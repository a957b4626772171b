"""Mapping a checkpoint layout's weight names onto a model's module names."""

from __future__ import annotations

from typing import Sequence

__all__ = ["rename_prefix"]


def rename_prefix(key: str, table: Sequence[tuple[str, str]]) -> str:
    """``key`` with the first matching (prefix, replacement) of ``table`` applied (list longer prefixes first);
    unchanged when none matches."""
    for prefix, replacement in table:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key
