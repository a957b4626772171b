"""Attention masks. Boolean masks: True where a query may attend to a key."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

__all__ = ["causal_mask", "padded_causal_mask", "block_diagonal_mask"]


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
