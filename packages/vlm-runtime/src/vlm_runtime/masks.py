"""Attention masks. Boolean masks: True where a query may attend to a key."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

__all__ = [
    "attention_mask_for",
    "block_diagonal_mask",
    "causal_mask",
    "grouped_window_mask",
    "padded_causal_mask",
]

AttentionMask = mx.array | str | None
"""What fused attention takes: None (every key), "causal" (queries are the last keys), or a boolean / additive array."""


def causal_mask(n_queries: int, offset: int = 0) -> mx.array:
    """(n_queries, offset + n_queries): query i sits at position offset + i and sees keys up to it."""
    q_pos = mx.arange(offset, offset + n_queries)[:, None]
    k_pos = mx.arange(offset + n_queries)[None, :]
    return q_pos >= k_pos


def padded_causal_mask(key_padding: mx.array, n_queries: int) -> mx.array:
    """Causal mask that also hides padded keys.

    ``key_padding`` is (batch, n_keys) with 1 for real tokens and 0 for padding (the processor's attention_mask);
    the queries are the last ``n_queries`` keys. Returns (batch, 1, n_queries, n_keys).
    """
    n_keys = key_padding.shape[1]
    causal = causal_mask(n_queries, n_keys - n_queries)
    return causal[None, None] & (key_padding[:, None, None, :] != 0)


def block_diagonal_mask(boundaries: list[int]) -> mx.array | None:
    """(n, n) mask for attention restricted to consecutive segments ``[b[i], b[i+1])``; None when one segment
    covers everything (attention needs no mask then, and skips building an n x n array)."""
    if len(boundaries) == 2:
        return None
    lengths = np.diff(np.asarray(boundaries))
    if (lengths < 0).any():
        raise ValueError(f"segment boundaries must be non-decreasing, got {boundaries}")
    segment = mx.array(np.repeat(np.arange(len(lengths)), lengths))
    return segment[:, None] == segment[None, :]


def grouped_window_mask(
    n_queries: int,
    n_past: int,
    *,
    window: int | None = None,
    groups: mx.array | None = None,
    window_limits_groups: bool = True,
) -> mx.array:
    """Causal mask with bidirectional groups and an optional sliding window.

    Query i sits at position ``n_past + i`` and sees key j (keys are the ``n_past`` earlier tokens, then the
    queries) when j is not later, or when both carry the same group id >= 0: ``groups`` (batch, n_queries) marks
    spans that attend both ways, like an image's tokens in Gemma 3 or the prefix in PaliGemma. With ``window``,
    a query only sees keys fewer than ``window`` positions before it; with ``window_limits_groups`` off, a group
    sees all of itself however long (PaliGemma's prefix), otherwise the window bounds it too (Gemma 3's images).
    Returns (n_queries, n_keys), or (batch, 1, n_queries, n_keys) with groups.
    """
    q_pos = mx.arange(n_past, n_past + n_queries)[:, None]
    k_pos = mx.arange(n_past + n_queries)[None, :]
    allowed = q_pos >= k_pos
    in_window = None if window is None else q_pos - k_pos < window
    if in_window is not None and not window_limits_groups:
        allowed = allowed & in_window
    if groups is not None:
        past = mx.full((groups.shape[0], n_past), -1, dtype=groups.dtype)
        key_groups = mx.concatenate([past, groups], axis=1)[:, None, :]
        same = (groups[:, :, None] == key_groups) & (groups[:, :, None] >= 0)
        allowed = (allowed[None] | same)[:, None]
    if in_window is not None and window_limits_groups:
        allowed = allowed & in_window
    return allowed


def attention_mask_for(
    n_queries: int,
    dtype: mx.Dtype,
    *,
    n_past: int = 0,
    window: int | None = None,
    groups: mx.array | None = None,
    key_padding: mx.array | None = None,
    window_limits_groups: bool = True,
) -> AttentionMask:
    """The mask for ``n_queries`` new tokens attending over ``n_past`` earlier keys followed by themselves.

    The simplest form that is right: None for one query, "causal" while no key leaves a query's ``window``,
    else a boolean array (``grouped_window_mask``). With ``key_padding`` ((batch, >= n_past + n_queries), 1 for
    real tokens; its last columns are these keys) the mask is additive with a finite minimum, so that a query
    row that is all padding averages its keys instead of turning NaN and leaking NaN into later layers.
    """
    if groups is None and key_padding is None and (window is None or n_past + n_queries <= window):
        return None if n_queries == 1 else "causal"
    allowed = grouped_window_mask(
        n_queries, n_past, window=window, groups=groups, window_limits_groups=window_limits_groups
    )
    if key_padding is None:
        return allowed
    allowed = allowed & (key_padding[:, None, None, -(n_past + n_queries) :] != 0)
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(mx.finfo(dtype).min, dtype))
