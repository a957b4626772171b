"""TurboQuant's codec: codebooks, rotations, bit packing, its distortion against the paper's, and the fused
encode kernel against the reference on every fast backend here."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_kernels.bitpack import CodeLayout, pack_codes, unpack_codes
from vlm_kernels.codebooks import coordinate_codebook
from vlm_kernels.turboquant import TURBOQUANT_BITS, TurboQuantCodec, TurboQuantPacked, turboquant_codec

from .backends import KERNEL_SETTINGS, fast_backends

HEAD_DIMS = (64, 80, 96, 128, 256)


def unit_vectors(n: int, dim: int, seed: int) -> mx.array:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return mx.array((x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))


# Table 1 / Theorem 1 of arXiv 2504.19874: MSE of TurboQuant_mse on unit vectors.
PAPER_DISTORTION = {2: 0.117, 3: 0.034, 4: 0.0095}


@pytest.mark.parametrize("bits", sorted(PAPER_DISTORTION))
@pytest.mark.parametrize("dim", [128, 96])
def test_distortion_matches_the_paper(bits: int, dim: int) -> None:
    codec = TurboQuantCodec(dim, bits, seed=11)
    x = unit_vectors(4000, dim, seed=bits)
    error = mx.sum((x - codec.decode(codec.encode(x))) ** 2, axis=-1)
    distortion = float(mx.mean(error))
    assert distortion == pytest.approx(PAPER_DISTORTION[bits], rel=0.05)


def test_fractional_bits_land_between_their_neighbours() -> None:
    x = unit_vectors(2000, 128, seed=5)
    distortion = {}
    for bits in TURBOQUANT_BITS:
        codec = TurboQuantCodec(128, bits, seed=2)
        distortion[bits] = float(mx.mean(mx.sum((x - codec.decode(codec.encode(x))) ** 2, axis=-1)))
    assert distortion[2] > distortion[2.5] > distortion[3] > distortion[3.5] > distortion[4]
    # A channel split costs what its halves cost: the mean of the two whole widths.
    assert distortion[3.5] == pytest.approx((distortion[3] + distortion[4]) / 2, rel=0.08)


@pytest.mark.parametrize("dim", [64, 128, 1024])
def test_codebooks_approach_the_gaussian_lloyd_max_quantizer(dim: int) -> None:
    # For large dim a coordinate is ~ N(0, 1/dim); the 2-bit Gaussian Lloyd-Max levels are ±0.4528, ±1.510.
    centroids, boundaries = coordinate_codebook(dim, 2)
    scaled = np.array(centroids) * math.sqrt(dim)
    assert np.allclose(scaled, [-1.510, -0.4528, 0.4528, 1.510], atol=0.03 if dim < 1000 else 0.004)
    assert list(centroids) == sorted(centroids) and np.allclose(centroids, -np.array(centroids[::-1]))
    assert all(a < b < c for a, b, c in zip(centroids, boundaries, centroids[1:]))


@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_rotations_are_orthogonal_and_hadamard_for_powers_of_two(dim: int) -> None:
    codec = TurboQuantCodec(dim, 3, seed=4)
    forward = np.array(codec.forward)
    assert np.allclose(forward @ forward.T, np.eye(dim), atol=1e-5)
    assert np.allclose(np.array(codec.inverse), forward.T)
    if dim & (dim - 1) == 0:
        assert np.allclose(np.abs(forward), 1 / math.sqrt(dim))
    other = TurboQuantCodec(dim, 3, seed=5)
    assert not np.allclose(np.array(other.forward), forward)
    assert np.array_equal(np.array(TurboQuantCodec(dim, 3, seed=4).forward), forward)


@KERNEL_SETTINGS
@given(
    dim=st.integers(4, 300),
    bits=st.sampled_from(TURBOQUANT_BITS),
    lead=st.lists(st.integers(1, 4), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_packing_round_trips(dim: int, bits: float, lead: list[int], seed: int) -> None:
    layout = CodeLayout.for_bits(dim, bits)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2 ** layout.widths(), size=(*lead, dim)).astype(np.uint32)
    words = pack_codes(mx.array(codes), layout)
    assert words.shape == (*lead, layout.words) and words.dtype == mx.uint32
    assert np.array_equal(np.array(unpack_codes(words, layout)), codes)
    # The stream is dense and least-significant first: compare with Python big integers.
    for index in np.ndindex(*lead):
        stream = sum(int(c) << int(o) for c, o in zip(codes[index], layout.offsets()))
        packed = sum(int(w) << (32 * i) for i, w in enumerate(np.array(words)[index]))
        assert packed == stream


def test_three_bit_codes_straddle_words() -> None:
    layout = CodeLayout.for_bits(128, 3)
    assert layout.words == 12  # 384 bits, no padding
    codes = np.zeros(128, np.uint32)
    codes[10] = 0b111  # bits 30..32: two in word 0, one in word 1
    words = np.array(pack_codes(mx.array(codes), layout))
    assert words[0] == 0b11 << 30 and words[1] == 1 and not words[2:].any()


def test_encode_keeps_norms_and_handles_zero_vectors() -> None:
    codec = TurboQuantCodec(96, 4, seed=0)
    x = mx.concatenate([mx.random.normal((5, 96)) * 7, mx.zeros((1, 96))])
    packed = codec.encode(x)
    assert packed.norms.dtype == mx.float16 and packed.norms.shape == (6, 1)
    assert np.allclose(np.array(packed.norms)[:, 0], np.linalg.norm(np.array(x), axis=-1), rtol=1e-3)
    decoded = np.array(codec.decode(packed))
    assert not decoded[-1].any()
    original = np.array(x[:5])
    cosine = (
        np.sum(decoded[:5] * original, -1) / np.linalg.norm(decoded[:5], axis=-1) / np.linalg.norm(original, axis=-1)
    )
    assert np.all(cosine > 0.99)  # 4 bits: about 0.995 on average


def test_codec_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="bits"):
        TurboQuantCodec(128, 5)
    with pytest.raises(ValueError, match="dim"):
        TurboQuantCodec(2, 3)
    with pytest.raises(ValueError, match="cannot encode"):
        TurboQuantCodec(128, 3).encode(mx.zeros((2, 64)))
    assert turboquant_codec(128, 3, 0) is turboquant_codec(128, 3, 0)


@pytest.mark.parametrize("backend", fast_backends())
@KERNEL_SETTINGS
@given(
    dim=st.sampled_from(HEAD_DIMS),
    bits=st.sampled_from(TURBOQUANT_BITS),
    n=st.integers(1, 300),
    dtype=st.sampled_from([mx.float16, mx.bfloat16, mx.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_encode_equals_the_reference(backend: str, dim: int, bits: float, n: int, dtype, seed: int) -> None:
    codec = turboquant_codec(dim, bits, seed % 7)
    x = (mx.random.normal((2, n, dim), key=mx.random.key(seed)) * 3).astype(dtype)
    fast = codec.encode(x, backend=backend)
    reference = codec.encode(x, backend="reference")
    assert fast.words.shape == reference.words.shape and fast.norms.shape == reference.norms.shape
    # Summation order differs: a coordinate within float rounding of a boundary may take the other code.
    same_codes = np.mean(np.array(codec.codes(fast.words)) == np.array(codec.codes(reference.words)))
    assert same_codes > 0.999
    assert np.allclose(np.array(fast.norms, np.float32), np.array(reference.norms, np.float32), rtol=2e-3)
    decoded = codec.decode(TurboQuantPacked(*fast))
    assert float(mx.max(mx.abs(decoded - codec.decode(reference)))) < 0.5 * float(mx.max(mx.abs(x)))
