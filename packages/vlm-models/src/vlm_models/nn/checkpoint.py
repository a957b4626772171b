"""Mapping a checkpoint layout's weight names onto a model's module names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx

from .vit import conv2d_weight_to_mlx

__all__ = ["rename_prefix", "renamed_weights"]


def rename_prefix(key: str, table: Sequence[tuple[str, str]]) -> str:
    """``key`` with the first matching (prefix, replacement) of ``table`` applied (list longer prefixes first);
    unchanged when none matches."""
    for prefix, replacement in table:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key


def renamed_weights(
    weights: Mapping[str, mx.array], table: Sequence[tuple[str, str]], *, tied: bool, num_channels: int
) -> dict[str, mx.array]:
    """A vision-language checkpoint's weights under our names: ``table`` applied to every key, a tied
    ``lm_head`` dropped, patch convolutions in MLX's channels-last layout. Pure and idempotent when ``table``
    maps our names to themselves."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        key = rename_prefix(key, table)
        if key == "lm_head.weight" and tied:
            continue
        if key.endswith("patch_embedding.weight"):
            value = conv2d_weight_to_mlx(value, num_channels)
        out[key] = value
    return out
