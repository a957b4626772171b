"""Merging an adapter into its base model and writing the result as a checkpoint (MLX-community layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from vlm_models.adapters import fuse_lora, read_adapter_config
from vlm_models.convert import save_model
from vlm_models.loading import load, load_config, resolve_model_path
from vlm_models.quantize import dequantize_model, quantize_model

from .config import QuantizationConfig

__all__ = ["FuseOptions", "fuse"]


@dataclass(frozen=True)
class FuseOptions:
    quantize: QuantizationConfig | None = None
    """Quantize the fused model (from a float base) with these settings."""
    dequantize: bool = False
    """Write every layer in float, also those of a quantized base."""

    def __post_init__(self) -> None:
        if self.quantize is not None and self.dequantize:
            raise ValueError("choose either --quantize or --dequantize, not both")


def _quantization_of(model: nn.Module, config: dict[str, Any], adapter: dict[str, Any]) -> dict[str, Any] | None:
    if not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        return None
    return config.get("quantization") or adapter.get("base_quantization")


def fuse(model_path: str, adapter_path: str, output: str | Path, options: FuseOptions = FuseOptions()) -> Path:
    """Load ``model_path`` with the adapter, fold the LoRA updates into the weights, and save to ``output``."""
    _, _, adapter = read_adapter_config(adapter_path)
    source = resolve_model_path(model_path)
    config = load_config(source)
    model, _ = load(source, adapter_path=adapter_path)
    fuse_lora(model, dequantize=options.dequantize)
    quantization = _quantization_of(model, config, adapter)
    if options.dequantize and quantization is not None:
        dequantize_model(model)
        quantization = None
    if options.quantize is not None:
        if quantization is not None:
            raise ValueError(f"{model_path} is already quantized; fuse without --quantize (or with --dequantize)")
        quantization = quantize_model(model, bits=options.quantize.bits, group_size=options.quantize.group_size)
    output = Path(output)
    if output.resolve() == source.resolve():
        raise ValueError("the fused model must go to a new folder, not over its base")
    # MLX-community configs repeat the quantization under this name; keep it in step with what is written.
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if quantization is not None:
        config["quantization_config"] = dict(quantization)
    return save_model(model, output, source=source, config=config, quantization=quantization)
