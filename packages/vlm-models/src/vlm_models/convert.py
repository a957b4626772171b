"""Quantizing a loaded model and writing it in the MLX-community layout (the layout ``load`` also reads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

__all__ = ["dequantize_model", "quantize_model", "save_model", "PROCESSOR_FILES"]

PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
MAX_SHARD_BYTES = 5 << 30


def quantize_model(model: nn.Module, *, bits: int = 4, group_size: int = 64, mode: str = "affine") -> dict[str, Any]:
    """Quantize, in place, every linear and embedding layer whose input width the group size divides.

    Returns the ``quantization`` entry for config.json. Layers that cannot be quantized stay in float.
    """

    # Layers the MLX-community layout stores as convolutions (Qwen's patch embedding) stay float there.
    float_only = tuple(getattr(model, "float_only_modules", ()))

    def quantizable(path: str, module: nn.Module) -> bool:
        if float_only and path.endswith(float_only):
            return False
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=quantizable)
    return {"group_size": group_size, "bits": bits, "mode": mode}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every quantized linear and embedding layer by its float equivalent."""

    def dequantized_weight(q: nn.Module) -> mx.array:
        return mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, mode=q.mode)

    replacements = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = dequantized_weight(module)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            linear.weight = weight
            if "bias" in module:
                linear.bias = module.bias
            replacements.append((path, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantized_weight(module)
            embedding = nn.Embedding(weight.shape[0], weight.shape[1])
            embedding.weight = weight
            replacements.append((path, embedding))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return model


def save_model(
    model: nn.Module,
    destination: str | Path,
    *,
    source: str | Path,
    config: Mapping[str, Any],
    quantization: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights (sharded safetensors with an index), config.json and the processor files
    copied from ``source``."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    weights = model.mlx_community_names(dict(tree_flatten(model.parameters())))
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(destination / name), shard, metadata={"format": "mlx"})
        index.update({key: name for key in shard})
    total = sum(v.nbytes for v in weights.values())
    (destination / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )
    new_config = dict(config)
    new_config.pop("quantization", None)
    if quantization is not None:
        new_config["quantization"] = dict(quantization)
    (destination / "config.json").write_text(json.dumps(new_config, indent=2))
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, destination / name)
    return destination
