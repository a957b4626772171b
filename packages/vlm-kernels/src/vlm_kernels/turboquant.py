"""TurboQuant (Zandieh et al., arXiv 2504.19874): vectors compressed to a norm and a few bits per coordinate.

Per vector x of dimension ``dim``: its L2 norm (float16), and the unit vector x/|x| rotated by a seeded random
orthogonal transform — a randomized Hadamard transform H·diag(±1)/sqrt(dim) where ``dim`` is a power of two, a
seeded Haar-random orthogonal matrix otherwise. After the rotation every coordinate follows the same known
density (that of a coordinate of a uniform unit vector), so one Lloyd-Max codebook per (dim, bits) quantizes
them all near-optimally, with no per-block scales to store. Codes are bit-packed into uint32 words
(``bitpack``: 3-bit codes straddle words).

Bits 2, 3 and 4; a fractional setting x.5 splits the channels, half of the rotated coordinates at x + 1 bits and
half at x (after the rotation no channel is special, so which half does not matter). A KV cache can also give
keys and values different widths (3-bit keys and 4-bit values average 3.5).

Attention never needs the vectors back in the original space: q·x̂ = |x| (R q)·c[codes] with R the rotation, and
a weighted sum of values can be summed in the values' rotated space and rotated back once
(``decode_attention``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import _sources
from .bitpack import CodeLayout, pack_codes, unpack_codes
from .codebooks import coordinate_codebook
from .dispatch import Kernel, cuda_kernel, metal_kernel, resolve

__all__ = ["ENCODE", "TURBOQUANT_BITS", "TurboQuantCodec", "TurboQuantPacked", "turboquant_codec"]

TURBOQUANT_BITS = (2, 2.5, 3, 3.5, 4)

ENCODE = Kernel(
    name="turboquant_encode",
    fast=("cuda", "metal"),
    verified=(
        ("reference", "CPU (this repo's CI)"),
        ("cuda", "NVIDIA H200, MLX 0.32.4: equal to the reference on tests/kernels' hypothesis shapes"),
    ),
)


class TurboQuantPacked(NamedTuple):
    """Encoded vectors: ``words`` (..., codec.words) uint32 and ``norms`` (..., 1) float16."""

    words: mx.array
    norms: mx.array


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _sylvester_hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _rotation(dim: int, seed: int) -> np.ndarray:
    """The forward matrix F (rotated = x @ F), orthogonal, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    if _is_power_of_two(dim):
        signs = rng.choice([-1.0, 1.0], size=dim)
        return signs[:, None] * _sylvester_hadamard(dim) / math.sqrt(dim)
    gaussian = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))[None, :]  # Haar-distributed, not just orthogonal


class TurboQuantCodec:
    """``encode(x)`` (any leading shape, last axis ``dim``) -> ``TurboQuantPacked``; ``decode(packed)`` -> x̂.

    ``bits``: 2, 3, 4, or 2.5 / 3.5 (channel split). ``seed`` fixes the rotation: data encoded with one seed
    must be decoded with the same.
    """

    def __init__(self, dim: int, bits: float, seed: int = 0) -> None:
        if dim < 4:
            raise ValueError(f"TurboQuantCodec needs dim >= 4, got {dim}")
        if bits not in TURBOQUANT_BITS:
            raise ValueError(f"TurboQuantCodec supports bits in {TURBOQUANT_BITS}, got {bits}")
        self.dim, self.bits, self.seed = dim, bits, seed
        self.layout = CodeLayout.for_bits(dim, bits)
        forward = _rotation(dim, seed).astype(np.float32)
        self.forward = mx.array(forward)
        """(dim, dim) float32: rotated = x @ forward."""
        self.inverse = mx.array(np.ascontiguousarray(forward.T))
        """(dim, dim) float32: x = rotated @ inverse."""
        high, high_bounds = coordinate_codebook(dim, self.layout.high_bits)
        low, low_bounds = coordinate_codebook(dim, self.layout.low_bits)
        self.centroids = mx.array(np.array(high + low, dtype=np.float32))
        """The high codebook's centroids, then the low one's (equal when ``bits`` is whole)."""
        self.boundaries = mx.array(np.array(high_bounds + low_bounds, dtype=np.float32))
        n_high = self.layout.n_high
        self._high_bounds = mx.array(np.array(high_bounds, dtype=np.float32))
        self._low_bounds = mx.array(np.array(low_bounds, dtype=np.float32))
        # Index into ``centroids``: a low code sits after the high codebook.
        self._code_base = mx.array(np.where(np.arange(dim) < n_high, 0, len(high)).astype(np.uint32))

    @property
    def words(self) -> int:
        """uint32 words per encoded vector."""
        return self.layout.words

    @property
    def bytes_per_vector(self) -> int:
        return 4 * self.words + 2

    def rotate(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.forward

    def unrotate(self, y: mx.array) -> mx.array:
        return y @ self.inverse

    # -- encoding
    def encode(self, x: mx.array, *, backend: str | None = None) -> TurboQuantPacked:
        """Norms and packed codes of every vector of ``x`` (fused rotate + quantize + pack on a GPU)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"TurboQuantCodec(dim={self.dim}) cannot encode vectors of size {x.shape[-1]}")
        chosen = resolve(ENCODE, backend)
        if chosen == "reference" or x.size == 0:
            return self._encode_reference(x)
        return self._encode_fused(x, chosen)

    def _encode_reference(self, x: mx.array) -> TurboQuantPacked:
        x = x.astype(mx.float32)
        norms = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
        inverse_norm = mx.where(norms > 0, 1.0 / mx.maximum(norms, 1e-30), 0.0)
        unit = (x @ self.forward) * inverse_norm
        return TurboQuantPacked(pack_codes(self._codes_of(unit), self.layout), _to_float16(norms))

    def _codes_of(self, unit: mx.array) -> mx.array:
        n_high = self.layout.n_high
        high = mx.sum(unit[..., :n_high, None] > self._high_bounds, axis=-1)
        if n_high == self.dim:
            return high
        low = mx.sum(unit[..., n_high:, None] > self._low_bounds, axis=-1)
        return mx.concatenate([high, low], axis=-1)

    def _encode_fused(self, x: mx.array, backend: str) -> TurboQuantPacked:
        lead = x.shape[:-1]
        n = math.prod(lead)
        build = cuda_kernel if backend == "cuda" else metal_kernel
        kernel = build(
            "turboquant_encode",
            ("x", "fwd", "bnd"),
            ("words", "norms"),
            _sources.thread_ids(backend) + _sources.ENCODE_BODY,
            _sources.prelude(backend),
        )
        layout = self.layout
        words, norms = kernel(
            inputs=[x.reshape(n, self.dim), self.forward, self.boundaries],
            template=[
                ("D", self.dim),
                ("HI", layout.high_bits),
                ("LO", layout.low_bits),
                ("NHI", layout.n_high),
                ("W", layout.words),
            ],
            grid=(n * 128, 1, 1),
            threadgroup=(128, 1, 1),
            output_shapes=[(n, layout.words), (n,)],
            output_dtypes=[mx.uint32, mx.float16],
        )
        return TurboQuantPacked(words.reshape(*lead, layout.words), norms.reshape(*lead, 1))

    # -- decoding
    def codes(self, words: mx.array) -> mx.array:
        """(..., words) -> (..., dim) uint32 codebook indices."""
        return unpack_codes(words, self.layout)

    def decode_rotated(self, packed: TurboQuantPacked) -> mx.array:
        """x̂ in the rotated space (float32): what attention scores against, with no rotation per key."""
        values = mx.take(self.centroids, self.codes(packed.words) + self._code_base)
        return values * packed.norms.astype(mx.float32)

    def decode(self, packed: TurboQuantPacked, dtype: mx.Dtype = mx.float32) -> mx.array:
        return self.unrotate(self.decode_rotated(packed)).astype(dtype)

    def __repr__(self) -> str:
        return f"TurboQuantCodec(dim={self.dim}, bits={self.bits}, seed={self.seed})"


def _to_float16(norms: mx.array) -> mx.array:
    return mx.minimum(norms, 65504.0).astype(mx.float16)  # float16's largest finite value


@functools.cache
def turboquant_codec(dim: int, bits: float, seed: int = 0) -> TurboQuantCodec:
    """One shared codec per (dim, bits, seed): caches of every layer reuse its rotation and codebooks."""
    return TurboQuantCodec(dim, bits, seed)
