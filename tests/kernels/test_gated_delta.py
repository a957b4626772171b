"""The fused gated-delta decode step: its mlx-ops reference against a float64 numpy loop written from the rule's
definition, the CUDA source (run on the CPU through ``cpu_emulator``, and on the GPU where one is MLX's default
device) against the reference, and the dispatch's refusals."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_kernels.gated_delta import gated_delta_decode, gated_delta_decode_reference

from . import cpu_emulator
from .backends import KERNEL_SETTINGS, fast_backends


@dataclass(frozen=True)
class Step:
    batch: int
    key_heads: int
    repeats: int
    key_dim: int
    value_dim: int
    padded_row: bool
    dtype: mx.Dtype
    seed: int

    @property
    def value_heads(self) -> int:
        return self.key_heads * self.repeats


def inputs(step: Step) -> dict[str, mx.array]:
    keys = iter(mx.random.split(mx.random.key(step.seed), 9))
    b, hk, hv, dk, dv = step.batch, step.key_heads, step.value_heads, step.key_dim, step.value_dim

    def normal(shape, scale=1.0, dtype=step.dtype):
        return (mx.random.normal(shape, key=next(keys)) * scale).astype(dtype)

    keep = np.ones(b, np.float32)
    if step.padded_row:
        keep[0] = 0.0
    return dict(
        q=normal((b, hk, dk), 2.0),
        k=normal((b, hk, dk), 0.5),
        v=normal((b, hv, dv)),
        a=normal((b, hv), 3.0),
        b=normal((b, hv), 2.0),
        a_log=normal((hv,), 1.0, mx.float32),
        dt_bias=normal((hv,), 1.0, mx.float32),
        state=normal((b, hv, dk, dv), 0.3, mx.float32),
        keep=mx.array(keep),
    )


def numpy_step(x: dict[str, mx.array]) -> tuple[np.ndarray, np.ndarray]:
    """The rule token by token, head by head, in float64."""
    f = {name: np.array(a.astype(mx.float32), np.float64) for name, a in x.items()}
    batch, value_heads, value_dim = f["v"].shape
    key_heads, key_dim = f["q"].shape[1:]
    y = np.zeros((batch, value_heads, value_dim))
    state = f["state"].copy()
    for row in range(batch):
        for hv in range(value_heads):
            hk = hv // (value_heads // key_heads)
            q = f["q"][row, hk] / np.sqrt((f["q"][row, hk] ** 2).sum() + 1e-6) / np.sqrt(key_dim)
            k = f["k"][row, hk] / np.sqrt((f["k"][row, hk] ** 2).sum() + 1e-6)
            kept = f["keep"][row]
            gate_in = f["a"][row, hv] + f["dt_bias"][hv]
            g = -np.exp(f["a_log"][hv]) * np.log1p(np.exp(gate_in)) * kept
            beta = kept / (1 + np.exp(-f["b"][row, hv]))
            s = state[row, hv] * np.exp(g)
            delta = (f["v"][row, hv] - k @ s) * beta
            s = s + np.outer(k, delta)
            state[row, hv] = s
            y[row, hv] = q @ s
    return y, state


def close(got: tuple[mx.array, mx.array], expected: tuple[np.ndarray, np.ndarray], tol: float) -> None:
    for actual, want in zip(got, expected):
        assert actual.dtype == mx.float32
        np.testing.assert_allclose(np.array(actual, np.float64), want, rtol=tol, atol=tol)


steps = st.builds(
    Step,
    batch=st.integers(1, 3),
    key_heads=st.integers(1, 3),
    repeats=st.sampled_from([1, 2, 3]),
    key_dim=st.sampled_from([8, 16, 64, 128]),
    value_dim=st.sampled_from([16, 32, 64]),
    padded_row=st.booleans(),
    dtype=st.sampled_from([mx.float32, mx.bfloat16]),
    seed=st.integers(0, 2**16),
)


@KERNEL_SETTINGS
@given(steps)
def test_the_reference_is_the_rule(step: Step) -> None:
    x = inputs(step)
    close(gated_delta_decode_reference(**x), numpy_step(x), 2e-5)


def test_a_padded_row_keeps_its_state() -> None:
    x = inputs(Step(2, 1, 2, 16, 32, True, mx.float32, 4))
    _, state = gated_delta_decode(**x, backend="reference")
    np.testing.assert_array_equal(np.array(state[0]), np.array(x["state"][0]))
    assert not np.allclose(np.array(state[1]), np.array(x["state"][1]))


EMULATED = {
    "GQA 2, padded row, bf16": Step(2, 2, 2, 32, 64, True, mx.bfloat16, 1),
    "Qwen3.5 head sizes": Step(1, 1, 2, 128, 128, False, mx.float32, 2),
}


@pytest.mark.slow
@pytest.mark.skipif(cpu_emulator.compiler() is None, reason="the emulation is built with g++ (C++20)")
@pytest.mark.parametrize("name", sorted(EMULATED))
def test_the_cuda_source_equals_the_reference(monkeypatch, name: str) -> None:
    x = inputs(EMULATED[name])
    expected = tuple(np.array(a, np.float64) for a in gated_delta_decode_reference(**x))
    with cpu_emulator.installed(monkeypatch):
        close(gated_delta_decode(**x, backend="cuda"), expected, 1e-5)


@pytest.mark.parametrize("backend", fast_backends())
@KERNEL_SETTINGS
@given(step=steps.filter(lambda s: s.key_dim % 8 == 0 and s.value_dim % 32 == 0))
def test_the_gpu_kernel_equals_the_reference(backend: str, step: Step) -> None:
    x = inputs(step)
    expected = tuple(np.array(a, np.float64) for a in gated_delta_decode_reference(**x))
    close(gated_delta_decode(**x, backend=backend), expected, 1e-5)


def test_shapes_the_kernel_does_not_cover_take_the_reference() -> None:
    # A value dim that is not a multiple of 32 has no fast launch; the call still answers, through the reference.
    x = inputs(Step(1, 1, 1, 16, 24, False, mx.float32, 5))
    close(gated_delta_decode(**x), numpy_step(x), 2e-5)


def test_a_backend_this_machine_lacks_is_refused() -> None:
    if "cuda" in fast_backends():
        pytest.skip("this machine runs CUDA")
    x = inputs(Step(1, 1, 1, 16, 32, False, mx.float32, 6))
    with pytest.raises(ValueError, match="cannot run here"):
        gated_delta_decode(**x, backend="cuda")
