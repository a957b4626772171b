"""Codes of a few bits each, packed back to back into uint32 words, as mlx ops (the reference).

A vector's codes form one bit stream: code i occupies the ``width[i]`` bits starting at bit ``offset[i]``,
least significant first, word after word, so a 3-bit code can straddle two words. ``CodeLayout`` allows two
widths (the first ``n_high`` codes at ``high_bits``, the rest at ``low_bits``): TurboQuant's fractional bit
settings split the channels that way. The CUDA and Metal kernels read and write the same layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = ["CodeLayout", "pack_codes", "unpack_codes"]


@dataclass(frozen=True)
class CodeLayout:
    dim: int
    high_bits: int
    low_bits: int
    n_high: int
    """Codes 0..n_high-1 take ``high_bits`` bits, the others ``low_bits``."""

    @classmethod
    def for_bits(cls, dim: int, bits: float) -> CodeLayout:
        """``bits`` whole: every code that wide; ``x.5``: half the codes (rounded down) one bit wider."""
        if float(bits).is_integer():
            return cls(dim, int(bits), int(bits), dim)
        if bits * 2 != math.floor(bits * 2):
            raise ValueError(f"fractional bits must be a whole number plus 0.5, got {bits}")
        return cls(dim, math.ceil(bits), math.floor(bits), dim // 2)

    @property
    def total_bits(self) -> int:
        return self.n_high * self.high_bits + (self.dim - self.n_high) * self.low_bits

    @property
    def words(self) -> int:
        return (self.total_bits + 31) // 32

    @property
    def bits(self) -> float:
        return self.total_bits / self.dim

    def widths(self) -> np.ndarray:
        return np.where(np.arange(self.dim) < self.n_high, self.high_bits, self.low_bits)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths())[:-1]])


@functools.cache
def _unpack_tables(layout: CodeLayout) -> tuple[mx.array, ...]:
    offsets, widths = layout.offsets(), layout.widths()
    word = offsets // 32
    shift = offsets % 32
    straddles = shift + widths > 32
    next_word = np.minimum(word + 1, layout.words - 1)
    return (
        mx.array(word.astype(np.int32)),
        mx.array(next_word.astype(np.int32)),
        mx.array(shift.astype(np.uint32)),
        mx.array(((32 - shift) % 32).astype(np.uint32)),
        mx.array(straddles),
        mx.array(((1 << widths) - 1).astype(np.uint32)),
    )


def unpack_codes(words: mx.array, layout: CodeLayout) -> mx.array:
    """(..., words) uint32 -> (..., dim) uint32 codes."""
    word, next_word, shift, back, straddles, mask = _unpack_tables(layout)
    low = mx.take(words, word, axis=-1) >> shift
    high = mx.where(straddles, mx.take(words, next_word, axis=-1) << back, mx.array(0, mx.uint32))
    return (low | high) & mask


@functools.cache
def _pack_tables(layout: CodeLayout) -> tuple[list[tuple[mx.array, mx.array]], mx.array, mx.array]:
    """Per word, the codes whose low bits land in it (as slots: code index and validity), and the one code, if
    any, whose high bits spill into it."""
    offsets, widths = layout.offsets(), layout.widths()
    first_word = offsets // 32
    per_word = [np.flatnonzero(first_word == w) for w in range(layout.words)]
    slots = []
    for s in range(max(len(p) for p in per_word)):
        index = np.array([p[s] if s < len(p) else 0 for p in per_word], dtype=np.int32)
        valid = np.array([s < len(p) for p in per_word])
        slots.append((mx.array(index), mx.array(valid)))
    spill = np.zeros(layout.words, dtype=np.int32)
    spills = np.zeros(layout.words, dtype=bool)
    for i in np.flatnonzero(offsets % 32 + widths > 32):
        spill[first_word[i] + 1], spills[first_word[i] + 1] = i, True
    return slots, mx.array(spill), mx.array(spills)


def pack_codes(codes: mx.array, layout: CodeLayout) -> mx.array:
    """(..., dim) integer codes (each below 2**width) -> (..., words) uint32."""
    codes = codes.astype(mx.uint32)
    offsets = mx.array(layout.offsets().astype(np.uint32))
    low = codes << (offsets % 32)  # bits beyond the word fall off: the spill below carries them
    high = codes >> ((32 - offsets % 32) % 32)
    slots, spill, spills = _pack_tables(layout)
    zero = mx.array(0, mx.uint32)
    words = mx.where(spills, mx.take(high, spill, axis=-1), zero)
    for index, valid in slots:
        words = words | mx.where(valid, mx.take(low, index, axis=-1), zero)
    return words
