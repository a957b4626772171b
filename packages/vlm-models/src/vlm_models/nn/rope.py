"""Rotary position embeddings in the half-split convention (HF's ``rotate_half``)."""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

__all__ = ["Rotate", "apply_rotary", "inverse_frequencies", "MultimodalRotary", "rotate_half"]

Rotate = Callable[[mx.array], mx.array]
"""Applies the rotation for a fixed set of positions to (batch, heads, length, head_dim) queries or keys."""


def inverse_frequencies(dim: int, theta: float) -> mx.array:
    # float32 like the reference, so float32 models match it to rounding.
    return 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate in float32 and return in x's dtype."""
    xf = x.astype(mx.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


class MultimodalRotary:
    """M-RoPE: each frequency takes its position from one of (time, height, width).

    ``sections`` splits the head_dim/2 frequencies into consecutive groups using axes 0, 1, 2. Text tokens have
    equal positions on all axes, so during decode this is plain RoPE and uses the fused kernel.
    """

    def __init__(self, head_dim: int, theta: float, sections: Sequence[int]) -> None:
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {list(sections)} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._inv_freq = inverse_frequencies(head_dim, theta)
        self._axis_of_freq = mx.array(np.repeat(np.arange(len(sections)), sections))

    def at_positions(self, position_ids: mx.array) -> Rotate:
        """``position_ids``: (3, batch, length) or (batch, length) for text-only positions."""
        if position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, *position_ids.shape))
        per_freq = position_ids.astype(mx.float32)[self._axis_of_freq]  # (half, batch, length)
        angles = per_freq.transpose(1, 2, 0) * self._inv_freq  # (batch, length, half)
        emb = mx.concatenate([angles, angles], axis=-1)[:, None]  # (batch, 1, length, head_dim)
        cos, sin = mx.cos(emb), mx.sin(emb)
        return lambda x: apply_rotary(x, cos, sin)

    def at_offset(self, offset: int | mx.array) -> Rotate:
        """Consecutive positions starting at ``offset`` (an int, or one per batch row)."""
        return lambda x: mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=offset
        )
