"""Activation quantization (`load(..., quantize_activations=True)`, `-qa`): what MLX can run where, the one-line
refusals, and the swap itself -- ``QQLinear`` over the checkpoint's own packed weights computes the product of the
quantized input and the quantized weight, checked on the single-row products the CPU can run."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vlm_models import load
from vlm_models.activation_quant import ActivationQuantError, backend_refusal, quantize_activations
from vlm_models.convert import ConvertOptions, convert
from vlm_models.quantize import QuantizeOptions

from .conftest import published
from .test_convert import vlm

ON_CPU = mx.default_device().type == mx.cpu


def converted(tmp_path: Path, family: str, mode: str) -> Path:
    out = tmp_path / f"{family}-{mode}"
    return convert(published(family), out, ConvertOptions(quantize=QuantizeOptions.for_mode(mode))).destination


@pytest.mark.skipif(not ON_CPU, reason="what the CPU backend can do")
@pytest.mark.parametrize("mode", ["mxfp8", "nvfp4"])
def test_the_cpu_cannot_prefill_activation_quantized_so_load_refuses(tmp_path: Path, mode: str) -> None:
    """MLX 0.32.4's CPU qqmm takes one row, not the many rows of a prompt: asking for it is refused in one line."""
    w = mx.quantize(mx.ones((8, 64)), mode=mode)
    mx.eval(mx.qqmm(mx.ones((1, 64)), w[0], scales=w[1], mode=mode))  # a single row runs...
    with pytest.raises(RuntimeError, match="NYI"):
        mx.eval(mx.qqmm(mx.ones((2, 64)), w[0], scales=w[1], mode=mode))  # ...two do not
    assert "cannot quantize activations on the cpu" in (backend_refusal(mode) or "")
    with pytest.raises(ActivationQuantError, match=rf"MLX {mx.__version__} cannot quantize activations on the cpu"):
        load(converted(tmp_path, "gemma3", mode), quantize_activations=True)


@pytest.mark.skipif(not ON_CPU, reason="what the CPU backend can do")
def test_generate_with_qa_on_the_cpu_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    folder = converted(tmp_path, "gemma3", "nvfp4")
    code, _, err = vlm(capsys, "generate", "--model", str(folder), "--prompt", "Hi", "--max-tokens", "2", "-qa")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot quantize activations on the cpu" in lines[0], err


def test_an_affine_or_float_checkpoint_is_refused(tmp_path: Path) -> None:
    for folder in (converted(tmp_path, "gemma3", "affine"), published("gemma3")):
        with pytest.raises(ActivationQuantError, match="applies to mxfp8 and nvfp4 checkpoints"):
            load(folder, quantize_activations=True)


def test_the_default_off_cuda_leaves_the_model_weight_only(tmp_path: Path, capsys) -> None:
    if mx.cuda.is_available():
        pytest.skip("on CUDA the default swaps")
    model, _ = load(converted(tmp_path, "gemma3", "mxfp8"))
    assert not any(isinstance(m, nn.QQLinear) for _, m in model.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert "activation quantization" not in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_the_swap_computes_quantized_input_times_quantized_weight(tmp_path: Path, family: str, mode: str) -> None:
    """Every bias-free linear layer becomes ``QQLinear`` over the same packed tensors, whose single-row output is
    exactly dequantize(quantize(x)) @ dequantize(W).T; layers with a bias, embeddings and experts stay and are
    named."""
    folder = converted(tmp_path, family, mode)
    model, _ = load(folder)
    before = {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    report = quantize_activations(model, check_backend=False)  # the backend check is the test above
    after = dict(model.named_modules())
    assert report.swapped and set(report.swapped) | {p for p, r in report.kept.items() if r == "bias"} == set(before)
    for path in report.kept:
        assert not isinstance(after[path], nn.QQLinear)
        assert report.kept[path] != "bias" or "bias" in after[path]
    rng = np.random.default_rng(0)
    for path in report.swapped:
        qq, original = after[path], before[path]
        assert isinstance(qq, nn.QQLinear) and qq.weight is original.weight and qq.scales is original.scales
        x = mx.array(rng.normal(size=(1, 1, qq.weight.shape[1] * 32 // qq.bits)).astype(np.float32))
        xq = mx.dequantize(*mx.quantize(x[0], mode=mode), mode=mode, dtype=mx.float32)
        w = mx.dequantize(original.weight, original.scales, mode=mode, dtype=mx.float32)
        np.testing.assert_allclose(np.array(qq(x))[0], np.array(xq @ w.T), rtol=1e-5, atol=1e-5, err_msg=path)
    if family == "qwen2_vl":  # Qwen2's q/k/v projections carry biases: named in the notice
        assert "bias" in report.notice() and "self_attn.q_proj" in report.notice()


@pytest.mark.parametrize("mode", ["mxfp8", "nvfp4"])
def test_a_one_token_step_costs_about_what_the_weights_quantization_costs(
    tmp_path: Path, mode: str, references
) -> None:
    """A decode-shaped forward pass (one text token: every product a single row) through the swapped model: rounding
    the inputs to the weights' format moves the logits by the same order as rounding the weights did (both are
    the same number format: measured 0.5x (mxfp8) and 0.7x (nvfp4) on this fixture)."""
    folder = converted(tmp_path, "gemma3", mode)
    float_model, _ = load(published("gemma3"))
    weight_only, _ = load(folder)
    swapped, _ = load(folder)
    quantize_activations(swapped, check_backend=False)
    ids = mx.array([[int(references["gemma3"].inputs("text")["input_ids"][0, 0])]])
    f, a, b = (np.array(m(input_ids=ids).logits) for m in (float_model, weight_only, swapped))
    weights_cost = np.abs(a - f).mean() / np.abs(f).mean()
    inputs_cost = np.abs(b - a).mean() / np.abs(f).mean()
    assert 0 < inputs_cost < 3 * weights_cost


@pytest.mark.skipif(not ON_CPU, reason="what the CPU backend can do")
def test_serve_passes_the_flag_to_load(tmp_path: Path) -> None:
    """`vlm serve -qa` reaches load: on the CPU its preload refuses with the one-line reason, the default loads."""
    import argparse
    import asyncio

    from vlm_serve.cli import add_arguments, settings_from
    from vlm_serve.host import ModelHost

    folder = str(converted(tmp_path, "gemma3", "mxfp8"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = {
        flags: settings_from(parser.parse_args(["--model", folder, *flags]))
        for flags in ((), ("-qa",), ("--no-quantize-activations",))
    }
    assert [s.quantize_activations for s in settings.values()] == [None, True, False]
    with pytest.raises(ActivationQuantError, match="cannot quantize activations on the cpu"):
        asyncio.run(ModelHost(settings[("-qa",)]).preload())
    host = ModelHost(settings[()])
    asyncio.run(host.preload())
    assert host.loaded is not None
    host.loaded.engine.close()


def test_the_cuda_default_swaps_with_a_notice_or_stays_weight_only(tmp_path: Path, monkeypatch, capsys) -> None:
    """The default's decision, with the backend questions answered as on CUDA (no GPU here): the swap happens with
    one notice line; where MLX refuses, the model stays weight-only with one line saying why; affine: no word."""
    from vlm_models import activation_quant

    folder = converted(tmp_path, "qwen2_vl", "nvfp4")
    monkeypatch.setattr(activation_quant, "on_cuda", lambda: True)
    refusal = backend_refusal("nvfp4")
    if refusal is not None:  # the CPU: MLX's own refusal is what the default reports
        model, _ = load(folder)
        assert not any(isinstance(m, nn.QQLinear) for _, m in model.named_modules())
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "the layers stay weight-only" in lines[0] and "cannot quantize" in lines[0]
    monkeypatch.setattr(activation_quant, "backend_refusal", lambda mode: None)
    model, _ = load(folder)
    assert any(isinstance(m, nn.QQLinear) for _, m in model.named_modules())
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "on by default on CUDA" in lines[0] and "weight-only (bias" in lines[0]
    load(converted(tmp_path, "qwen2_vl", "affine"))
    assert capsys.readouterr().err == ""
    load(folder, quantize_activations=False)
    assert capsys.readouterr().err == ""
