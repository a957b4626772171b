"""Adapters written by training load back through vlm_models.load and fuse into the same model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vlm_models import load
from vlm_models.adapters import AdapterError
from vlm_train.config import TrainingConfig
from vlm_train.fuse import FuseOptions, fuse
from vlm_train.trainer import Trainer

from .conftest import FLOAT_MODEL, QUANTIZED_MODEL, probe_logits, small_dataset


def trained_adapter(tmp_path: Path, model_path: Path = FLOAT_MODEL, **overrides) -> tuple[Path, mx.array]:
    """Train a few steps at a high learning rate (so the adapter matters); the adapter folder and the logits of
    the trained model itself."""
    values = dict(
        model=str(model_path),
        train_data=str(small_dataset(tmp_path / "data")),
        output=str(tmp_path / "adapter"),
        steps=6,
        batch_size=2,
        learning_rate=2e-2,
        progress=False,
    )
    values.update(overrides)
    model, processor = load(model_path)
    trainer = Trainer(model, processor, TrainingConfig(**values), report=lambda message: None)
    trainer.run()
    return tmp_path / "adapter", probe_logits(trainer.model, processor)


def test_saved_adapter_reloads_and_fuses_to_the_same_logits(tmp_path: Path) -> None:
    adapter, trained_logits = trained_adapter(tmp_path)
    base, processor = load(FLOAT_MODEL)
    base_logits = probe_logits(base, processor)
    assert float(mx.abs(trained_logits - base_logits).max()) > 1e-2, "the adapter should change the model"

    with_adapter, _ = load(FLOAT_MODEL, adapter_path=adapter)
    unfused = probe_logits(with_adapter, processor)
    np.testing.assert_allclose(np.array(unfused), np.array(trained_logits), atol=1e-5)

    fused_dir = fuse(str(FLOAT_MODEL), str(adapter), tmp_path / "fused")
    weights = mx.load(str(fused_dir / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    assert any(k.startswith("language_model.model.") for k in weights)  # the MLX-community layout
    fused, fused_processor = load(fused_dir)
    np.testing.assert_allclose(np.array(probe_logits(fused, fused_processor)), np.array(unfused), atol=1e-4)


def test_fuse_can_quantize(tmp_path: Path) -> None:
    adapter, trained_logits = trained_adapter(tmp_path)
    fused_dir = fuse(str(FLOAT_MODEL), str(adapter), tmp_path / "fused", FuseOptions(quantize=_q(32)))
    config = json.loads((fused_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    fused, processor = load(fused_dir)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    logits = probe_logits(fused, processor)
    # 4-bit rounding moves the logits, but far less than the adapter did.
    base, _ = load(FLOAT_MODEL)
    adapter_effect = float(mx.abs(trained_logits - probe_logits(base, processor)).max())
    assert float(mx.abs(logits - trained_logits).max()) < adapter_effect


def test_qlora_adapter_fuses_onto_its_quantized_base(tmp_path: Path) -> None:
    adapter, trained_logits = trained_adapter(tmp_path, QUANTIZED_MODEL, fine_tune_type="qlora")
    dense_dir = fuse(str(QUANTIZED_MODEL), str(adapter), tmp_path / "dense", FuseOptions(dequantize=True))
    dense_config = json.loads((dense_dir / "config.json").read_text())
    assert "quantization" not in dense_config and "quantization_config" not in dense_config
    dense, processor = load(dense_dir)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    np.testing.assert_allclose(np.array(probe_logits(dense, processor)), np.array(trained_logits), atol=1e-4)
    requantized_dir = fuse(str(QUANTIZED_MODEL), str(adapter), tmp_path / "requantized")
    assert json.loads((requantized_dir / "config.json").read_text())["quantization"]["bits"] == 4
    requantized, _ = load(requantized_dir)
    assert all(
        isinstance(m, nn.QuantizedLinear)
        for path, m in requantized.named_modules()
        if path.startswith("model.language_model.layers.") and isinstance(m, (nn.Linear, nn.QuantizedLinear))
    )


def _q(group_size: int):
    from vlm_train.config import QuantizationConfig

    return QuantizationConfig(bits=4, group_size=group_size)


def test_adapter_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter_config.json"):  # noqa: RUF043
        load(FLOAT_MODEL, adapter_path=tmp_path)
    adapter, _ = trained_adapter(tmp_path, steps=1)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["lora"]["rank"] = 4  # the stored matrices have rank 8
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="lora_a has shape"):
        load(FLOAT_MODEL, adapter_path=adapter)
    config["fine_tune_type"] = "dora"
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="unknown fine_tune_type"):
        load(FLOAT_MODEL, adapter_path=adapter)


def test_full_fine_tune_fuses_to_a_plain_checkpoint(tmp_path: Path) -> None:
    adapter, trained_logits = trained_adapter(tmp_path, fine_tune_type="full", learning_rate=3e-3)
    fused, processor = load(fuse(str(FLOAT_MODEL), str(adapter), tmp_path / "fused"))
    np.testing.assert_allclose(np.array(probe_logits(fused, processor)), np.array(trained_logits), atol=1e-4)
