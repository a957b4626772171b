"""Fused q/k/v and gate/up projections: the same logits as the separate layers, no stale weights after a layer
changes, and checkpoints that save exactly as they were read."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vlm_models import load
from vlm_models.convert import save_model
from vlm_models.nn.fused import fuse_projections, unfuse_projections
from vlm_models.nn.layers import Attention

from .conftest import FIXTURES, Reference

SOURCE = FIXTURES / "qwen2_vl" / "hf4"


def logits(model, ref: Reference) -> np.ndarray:
    inputs = {k: mx.array(v) for k, v in ref.inputs("one_image").items()}
    return np.array(model(**inputs).logits)


def test_fused_equals_separate_and_never_goes_stale(references) -> None:
    ref = references["qwen2_vl"]
    model, _ = load(SOURCE)
    attention = next(m for _, m in model.named_modules() if isinstance(m, Attention))
    assert attention._qkv is not None
    fused = logits(model, ref)
    np.testing.assert_allclose(fused, ref.get("one_image", "logits"), atol=1e-4)
    unfuse_projections(model)
    np.testing.assert_allclose(fused, logits(model, ref), atol=1e-5)
    assert fuse_projections(model) > 0
    # A layer's weight replaced after fusing: the fused product must not be used.
    attention.v_proj.weight = attention.v_proj.weight * 2
    changed = logits(model, ref)
    unfuse_projections(model)
    np.testing.assert_allclose(changed, logits(model, ref), atol=1e-5)
    assert np.abs(changed - fused).max() > 1e-3


def test_saved_checkpoint_is_unchanged(tmp_path: Path) -> None:
    """An MLX-community checkpoint, loaded (projections fused) and saved, is the same tensors under the same names."""
    source = FIXTURES / "qwen2_vl" / "mlx_community"
    model, _ = load(source)
    assert any(isinstance(m, Attention) and m._qkv is not None for _, m in model.named_modules())
    config = json.loads((source / "config.json").read_text())
    out = save_model(model, tmp_path / "again", source=source, config=config)
    original = {}
    for file in source.glob("*.safetensors"):
        original.update(mx.load(str(file)))
    saved = dict(mx.load(str(out / "model.safetensors")))
    assert set(saved) == set(original)
    for key, value in original.items():
        assert saved[key].dtype == value.dtype and mx.array_equal(saved[key], value), key


def test_replacing_layers_fuses_the_new_ones() -> None:
    """Dequantizing (like quantizing, or merging adapters) swaps the layers: the fusion follows the new ones."""
    from vlm_models.quantize import dequantize_model

    model, _ = load(FIXTURES / "qwen2_vl" / "mlx_community_4bit")
    attention = next(m for _, m in model.named_modules() if isinstance(m, Attention) and m._qkv is not None)
    assert isinstance(attention._qkv.fused, nn.QuantizedLinear)
    dequantize_model(model)
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    assert type(attention._qkv.fused) is nn.Linear
    x = mx.random.normal((1, 3, attention.q_proj.weight.shape[1]))
    for ours, separate in zip(attention._qkv(x, layers), (layer(x) for layer in layers)):
        np.testing.assert_allclose(np.array(ours), np.array(separate), atol=1e-5)
