"""Rotary position embeddings in the half-split convention (HF's ``rotate_half``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

__all__ = [
    "AxialRotary",
    "MultimodalRotary",
    "Rotary",
    "Rotate",
    "SplitAxialRotary",
    "apply_rotary",
    "axis_of_frequency",
    "inverse_frequencies",
    "proportional_frequencies",
    "rotate_half",
    "rotate_leading",
]

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


# One fused kernel instead of seven small ones; only used for one-token decode, whose shapes never change,
# so the compiled graph is traced once.
_apply_rotary_decode = mx.compile(apply_rotary)


def _tables(angles: mx.array) -> tuple[mx.array, mx.array]:
    """cos/sin of (batch, length, head_dim/2) angles, shaped (batch, 1, length, head_dim) for the heads axis."""
    emb = mx.concatenate([angles, angles], axis=-1)[:, None]
    return mx.cos(emb), mx.sin(emb)


def _rotate_with(cos: mx.array, sin: mx.array) -> Rotate:
    return lambda x: (_apply_rotary_decode if x.shape[2] == 1 else apply_rotary)(x, cos, sin)


def proportional_frequencies(head_dim: int, theta: float, fraction: float, factor: float = 1.0) -> mx.array:
    """Gemma 4's "proportional" RoPE: the first ``fraction`` of the head_dim/2 frequencies as plain RoPE over the
    whole head_dim would have them, the rest zero (those pairs never turn), all divided by ``factor``."""
    rotated = int(fraction * head_dim // 2)
    turning = 1.0 / (theta ** (mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim))
    return mx.concatenate([turning, mx.zeros((head_dim // 2 - rotated,), mx.float32)]) / factor


class Rotary:
    """Plain RoPE; ``position_scale`` multiplies every position (1 / factor of "linear" rope scaling).
    ``inv_freq`` (head_dim/2 values) replaces the frequencies ``theta`` would give (zeros leave a pair as it is)."""

    def __init__(
        self, head_dim: int, theta: float, position_scale: float = 1.0, inv_freq: mx.array | None = None
    ) -> None:
        self.head_dim = head_dim
        self.theta = float(theta)
        self.position_scale = float(position_scale)
        self._inv_freq = inverse_frequencies(head_dim, theta) if inv_freq is None else inv_freq
        # mx.fast.rope takes wavelengths: a zero frequency is an infinite one (the angle stays 0).
        self._wavelengths = None if inv_freq is None else 1.0 / inv_freq

    def at_positions(self, position_ids: mx.array) -> Rotate:
        """``position_ids``: (batch, length)."""
        positions = position_ids.astype(mx.float32) * self.position_scale
        return _rotate_with(*_tables(positions[..., None] * self._inv_freq))

    def at_offset(self, offset: int | mx.array) -> Rotate:
        """Consecutive positions starting at ``offset`` (an int, or one per batch row)."""
        if mx.default_device() == mx.gpu:
            base = self.theta if self._wavelengths is None else None
            return lambda x: mx.fast.rope(
                x,
                self.head_dim,
                traditional=False,
                base=base,
                scale=self.position_scale,
                offset=offset,
                freqs=self._wavelengths,
            )
        # On the CPU, MLX's rope is built from many small ops per call; one table serves every layer.
        start = mx.array(offset).reshape(-1, 1)
        cache: dict[int, Rotate] = {}

        def rotate(x: mx.array) -> mx.array:
            length = x.shape[2]
            if length not in cache:
                positions = (start + mx.arange(length)).astype(mx.float32) * self.position_scale
                cache[length] = _rotate_with(*_tables(positions[..., None] * self._inv_freq))
            return cache[length](x)

        return rotate


def rotate_leading(rotate: Rotate, dims: int) -> Rotate:
    """``rotate`` on the first ``dims`` features of each head only, the rest passed through (partial rotary, as
    ``partial_rotary_factor`` configures it in transformers)."""
    return lambda x: mx.concatenate([rotate(x[..., :dims]), x[..., dims:]], axis=-1)


def axis_of_frequency(sections: Sequence[int], interleaved: bool = False) -> np.ndarray:
    """Which position axis (0 time, 1 height, 2 width) each of the sum(sections) rotary frequencies reads."""
    if not interleaved:
        return np.repeat(np.arange(len(sections)), sections)
    index = np.arange(sum(sections))
    axis = np.zeros_like(index)
    for dim in (1, 2):
        axis[(index % 3 == dim) & (index < 3 * sections[dim])] = dim
    return axis


class MultimodalRotary(Rotary):
    """M-RoPE: each frequency takes its position from one of (time, height, width).

    ``sections`` splits the head_dim/2 frequencies into consecutive groups using axes 0, 1, 2; ``interleaved``
    (Qwen3-VL) instead cycles time, height, width over the frequencies, the first ``3 * sections[1]`` taking
    height and width in turn and the rest time. Text tokens have equal positions on all axes, so during decode
    this is plain RoPE.
    """

    def __init__(self, head_dim: int, theta: float, sections: Sequence[int], interleaved: bool = False) -> None:
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {list(sections)} must sum to head_dim/2 = {head_dim // 2}")
        super().__init__(head_dim, theta)
        self._axis_of_freq = mx.array(axis_of_frequency(sections, interleaved))

    def at_positions(self, position_ids: mx.array) -> Rotate:
        """``position_ids``: (3, batch, length) or (batch, length) for text-only positions."""
        if position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, *position_ids.shape))
        per_freq = position_ids.astype(mx.float32)[self._axis_of_freq]  # (half, batch, length)
        return _rotate_with(*_tables(per_freq.transpose(1, 2, 0) * self._inv_freq))


class AxialRotary:
    """2D RoPE over a patch grid (Pixtral): the even frequencies turn with the patch row, the odd ones with the
    column, the row half first; the whole head_dim rotates."""

    def __init__(self, head_dim: int, theta: float) -> None:
        freqs = inverse_frequencies(head_dim, theta)
        self._row_freqs, self._col_freqs = freqs[0::2], freqs[1::2]

    def at_grid(self, rows: mx.array, cols: mx.array) -> Rotate:
        """``rows`` / ``cols``: (length,) patch coordinates of a flat sequence of patches."""
        angles = mx.concatenate(
            [rows.astype(mx.float32)[:, None] * self._row_freqs, cols.astype(mx.float32)[:, None] * self._col_freqs],
            axis=-1,
        )
        return _rotate_with(*_tables(angles[None]))


class SplitAxialRotary:
    """2D RoPE over a patch grid (Gemma 4's vision tower): the head splits into halves, the first turning with the
    patch column (x), the second with the row (y), each half rotated in the half-split convention with the
    head_dim/4 frequencies of a half-size head."""

    def __init__(self, head_dim: int, theta: float) -> None:
        if head_dim % 4:
            raise ValueError(f"2D rotary needs a head_dim divisible by 4, got {head_dim}")
        self._inv_freq = inverse_frequencies(head_dim // 2, theta)

    def at_grid(self, positions: mx.array) -> Rotate:
        """``positions``: (batch, patches, 2) integer (x, y) coordinates."""
        angles = positions.astype(mx.float32)[..., None] * self._inv_freq  # (batch, patches, 2, head_dim/4)
        tables = [_tables(angles[:, :, axis]) for axis in (0, 1)]

        def rotate(x: mx.array) -> mx.array:
            half = x.shape[-1] // 2
            parts = [apply_rotary(x[..., i * half : (i + 1) * half], *tables[i]) for i in (0, 1)]
            return mx.concatenate(parts, axis=-1)

        return rotate
