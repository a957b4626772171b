"""The CUDA path's own source text, run on the CPU (``cpu_emulator``), equals the mlx-ops reference: one-pass and
split-K decode attention for both formats (GQA, ragged rows, a mask, a channel-split codec), and the encoder.
Where a GPU is MLX's default device, test_decode_attention.py runs the same sources on it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from . import cpu_emulator
from .test_decode_attention import Case, affine_inputs, close, run_affine, run_turboquant, turboquant_inputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(cpu_emulator.compiler() is None, reason="the emulation is built with g++ (C++20)"),
]

CASES = {
    "one pass, GQA 6": Case(1, 2, 6, 128, 128, 200, 9, (0,), False, mx.bfloat16, 1),
    "split-K, ragged, masked": Case(2, 1, 3, 96, 96, 300, 0, (0, 41), True, mx.float16, 2),
    "split-K, value dim 64": Case(1, 2, 1, 80, 64, 290, 3, (7,), False, mx.float32, 3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_turboquant_source_equals_the_reference(monkeypatch, name: str) -> None:
    case = CASES[name]
    inputs = turboquant_inputs(case, 3.5, 4)
    expected = np.array(run_turboquant(case, inputs, "reference").astype(mx.float32), np.float64)
    with cpu_emulator.installed(monkeypatch):
        close(run_turboquant(case, inputs, "cuda"), expected, case.dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_affine_source_equals_the_reference(monkeypatch, bits: int) -> None:
    case = Case(2, 2, 2, 128, 128, 300, 0, (5, 0), bits == 8, mx.float16, bits)
    inputs = affine_inputs(case, bits, 32)
    expected = np.array(run_affine(case, inputs, bits, 32, "reference").astype(mx.float32), np.float64)
    with cpu_emulator.installed(monkeypatch):
        close(run_affine(case, inputs, bits, 32, "cuda"), expected, case.dtype)


def test_encode_source_equals_the_reference(monkeypatch) -> None:
    from vlm_kernels.turboquant import TurboQuantCodec

    codec = TurboQuantCodec(80, 2.5, seed=3)
    x = mx.random.normal((3, 70, 80), key=mx.random.key(0)) * 4
    reference = codec.encode(x, backend="reference")
    with cpu_emulator.installed(monkeypatch):
        emulated = codec.encode(x, backend="cuda")
    assert np.mean(np.array(emulated.words) == np.array(reference.words)) > 0.999
    np.testing.assert_allclose(np.array(emulated.norms, np.float32), np.array(reference.norms, np.float32), rtol=1e-3)
