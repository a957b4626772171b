"""The LoRA layer and target selection (vlm_models.adapters), independent of the training loop."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models import load
from vlm_models.adapters import AdapterError, LoRAConfig, LoRALinear, apply_lora, fuse_lora, target_paths

from .conftest import FLOAT_MODEL


def _random_lora(linear: nn.Module, rank: int, seed: int) -> LoRALinear:
    layer = LoRALinear.from_base(linear, rank=rank, scale=1.5)
    key = mx.random.key(seed)
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=key) * 0.1
    return layer


def test_fresh_adapter_changes_nothing() -> None:
    base = nn.Linear(32, 48)
    x = mx.random.normal((3, 32))
    assert mx.array_equal(LoRALinear.from_base(base, rank=4)(x), base(x))


@given(rank=st.integers(1, 8), seed=st.integers(0, 2**16), bias=st.booleans())
@settings(max_examples=25, deadline=None)
def test_fused_layer_computes_the_same(rank: int, seed: int, bias: bool) -> None:
    base = nn.Linear(32, 24, bias=bias)
    layer = _random_lora(base, rank, seed)
    x = mx.random.normal((5, 32), key=mx.random.key(seed + 1))
    fused = layer.fuse()
    assert isinstance(fused, nn.Linear)
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-5)


def test_lora_on_a_quantized_base() -> None:
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    layer = _random_lora(base, 4, 0)
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 32)
    x = mx.random.normal((2, 64))
    dense = layer.fuse(dequantize=True)
    assert isinstance(dense, nn.Linear)
    np.testing.assert_allclose(np.array(dense(x)), np.array(layer(x)), atol=1e-4)
    requantized = layer.fuse()
    assert isinstance(requantized, nn.QuantizedLinear) and requantized.bits == 4 and requantized.group_size == 32


def test_rejects_non_linear() -> None:
    with pytest.raises(TypeError):
        LoRALinear.from_base(nn.Embedding(10, 4))


def test_default_targets_are_the_language_model_projections() -> None:
    model, _ = load(FLOAT_MODEL)
    paths = target_paths(model, LoRAConfig())
    layers = model.config.text.num_hidden_layers
    assert len(paths) == 7 * layers
    assert all(p.startswith("model.language_model.layers.") for p in paths)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {p.rsplit(".", 1)[1] for p in paths} == projections


def test_vision_and_projector_targets_are_separate() -> None:
    model, _ = load(FLOAT_MODEL)
    vision = target_paths(model, LoRAConfig(targets=("vision",)))
    projector = target_paths(model, LoRAConfig(targets=("projector",)))
    assert vision and all(p.startswith("model.visual.") and ".merger." not in p for p in vision)
    assert projector == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    both = target_paths(model, LoRAConfig(targets=("language", "vision", "projector")))
    assert set(vision) | set(projector) < set(both)


def test_module_patterns_replace_groups() -> None:
    model, _ = load(FLOAT_MODEL)
    paths = target_paths(model, LoRAConfig(modules=("*.q_proj", "*.v_proj")))
    assert len(paths) == 2 * model.config.text.num_hidden_layers
    with pytest.raises(AdapterError, match="no linear layer"):
        apply_lora(model, LoRAConfig(modules=("*.nothing",)))


def test_apply_then_fuse_round_trip_on_the_model() -> None:
    model, _ = load(FLOAT_MODEL)
    ids = mx.array([[1, 2, 3, 4, 5]])
    before = model(ids).logits
    apply_lora(model, LoRAConfig(rank=4))
    assert mx.array_equal(model(ids).logits, before)  # lora_b starts at zero
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.05
    adapted = model(ids).logits
    assert not np.allclose(np.array(adapted), np.array(before), atol=1e-3)
    assert fuse_lora(model) == 14
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(ids).logits), np.array(adapted), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ("decoder",)}, {"targets": ()}]
)
def test_invalid_lora_config(kwargs) -> None:
    with pytest.raises(ValueError):
        LoRAConfig(**kwargs)
