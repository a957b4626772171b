"""The kernel-backed quantized layers: a loaded quantized checkpoint uses them, saves unchanged, and its logits
through ``quantized_matvec`` (forced, every linear and the tied head) equal MLX's ``quantized_matmul`` ones within
float rounding: on a CUDA GPU where there is one, and through the CPU emulation of the CUDA source here."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vlm_kernels import dispatch
from vlm_kernels import quantized_matvec as qmv
from vlm_models import load
from vlm_models.convert import save_model
from vlm_models.nn.kernel_linear import KernelQuantizedEmbedding, KernelQuantizedLinear, use_matvec_kernels

from ..kernels import cpu_emulator
from ..kernels.backends import FAST_BACKENDS
from .conftest import FIXTURES

QUANTIZED = FIXTURES / "qwen2_vl" / "mlx_community_4bit"
PROMPT = [[344, 17, 42, 99, 5, 250, 31, 7, 120, 64, 3]]  # text only: 11 rows, within the kernel's 32


def text_logits(model) -> np.ndarray:
    return np.array(model(input_ids=mx.array(PROMPT)).logits.astype(mx.float32))


def with_backend(monkeypatch, name: str | None) -> None:
    if name is None:
        monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.BACKEND_ENV, name)
    dispatch.reread_environment()


def test_loaded_quantized_layers_are_kernel_backed_and_save_unchanged(tmp_path: Path) -> None:
    model, _ = load(QUANTIZED)
    kinds = {type(m) for _, m in model.named_modules()}
    assert KernelQuantizedLinear in kinds and nn.QuantizedLinear not in kinds
    assert use_matvec_kernels(model) == 0  # idempotent: nothing left to re-type
    config = json.loads((QUANTIZED / "config.json").read_text())
    out = save_model(model, tmp_path / "again", source=QUANTIZED, config=config, quantization=config["quantization"])
    source = mx.load(str(QUANTIZED / "model.safetensors"))
    saved = mx.load(str(out / "model.safetensors"))
    assert set(saved) == set(source)
    for key, value in source.items():
        assert saved[key].dtype == value.dtype and saved[key].shape == value.shape, key
        assert mx.array_equal(saved[key], value), key


def fused_groups(model) -> list:
    groups = [getattr(m, name, None) for _, m in model.named_modules() for name in ("_qkv", "_gate_up")]
    return [g for g in groups if g is not None]


def _logits_agree(monkeypatch) -> None:
    with_backend(monkeypatch, "reference")
    model, _ = load(QUANTIZED)
    expected = text_logits(model)
    launches = []
    launch = qmv._launch
    monkeypatch.setattr(qmv, "_launch", lambda *a: launches.append(a[-2]) or launch(*a))
    with_backend(monkeypatch, "cuda")
    try:
        ours = text_logits(model)
    finally:
        with_backend(monkeypatch, None)
    linears = [m for _, m in model.named_modules() if isinstance(m, KernelQuantizedLinear)]
    tied = any(isinstance(m, KernelQuantizedEmbedding) for _, m in model.named_modules())
    # Fused projections (q/k/v, gate/up) are one product each.
    saved = sum(len(f.layers) - 1 for f in fused_groups(model))
    assert saved > 0
    assert len(launches) == len(linears) + tied - saved, "not every quantized product went through the kernel"
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() / scale < 2e-3, "kernel logits differ from MLX's"
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() > 0.9


@pytest.mark.skipif("cuda" not in FAST_BACKENDS, reason="no CUDA GPU is MLX's default device here")
def test_logits_through_the_kernel_on_the_gpu(monkeypatch) -> None:
    _logits_agree(monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(cpu_emulator.compiler() is None, reason="the emulation is built with g++ (C++20)")
def test_logits_through_the_emulated_kernel(monkeypatch) -> None:
    with cpu_emulator.installed(monkeypatch):
        _logits_agree(monkeypatch)
