"""Converting checkpoints: a loaded model (quantized or dequantized through ``quantize``) written in the
MLX-community layout, the layout ``load`` also reads. ``convert`` is what ``vlm convert`` runs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .loading import load_config, load_model, resolve_model_path
from .quantize import (
    QUANTIZED_LAYERS,
    QuantizeOptions,
    dequantize_model,
    is_quantized,
    is_vision_tower,
    quantize_layers,
    quantize_model,
)
from .recipes import LayerChoice, plan_from_file, plan_from_recipe, recipe_by_name
from .registry import architecture_of

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertReport",
    "convert",
    "save_model",
    # Where users of the first release imported them from; they live in ``quantize`` now.
    "QuantizeOptions",
    "dequantize_model",
    "quantize_model",
]

MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANTIZATION_KEYS = ("group_size", "bits", "mode")
# What travels with the weights: tokenizer, processor, chat template and generation settings (every layout's
# names); config.json and the weight index are written anew.
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
_REWRITTEN = {"config.json", "model.safetensors.index.json"}
# Files that describe the source's weights (the demo model's measured score): new weights (cast, quantized, fused)
# have not earned them.
_ABOUT_THE_WEIGHTS = {"demo_score.json"}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why, in one line."""


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (quantized weights and integer scales stay as they are)."""
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def _layout_names(model: nn.Module, params: Mapping[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The weights under their MLX-community names, and each of our layer paths' name in that layout."""
    rename = model.mlx_community_names
    weights: dict[str, mx.array] = {}
    layers: dict[str, str] = {}
    for key, value in params.items():
        stored = rename({key: value})
        weights.update(stored)
        if len(stored) == 1 and key.endswith(".weight"):
            layers[key.removesuffix(".weight")] = next(iter(stored)).removesuffix(".weight")
    return weights, layers


def _shard(weights: Mapping[str, mx.array], max_shard_bytes: int) -> list[dict[str, mx.array]]:
    """Consecutive keys (sorted) in shards of at most ``max_shard_bytes``; a larger tensor gets a shard alone."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    return shards


def save_model(
    model: nn.Module,
    destination: str | Path,
    *,
    source: str | Path,
    config: Mapping[str, Any],
    quantization: Mapping[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write ``model``'s weights (sharded safetensors with an index), config.json and the tokenizer, processor and
    chat template files copied from ``source``.

    Per-layer entries of ``quantization`` (keyed by the model's layer paths) are written under the layout's names.
    With ``progress``, a bar counts the tensors as they are computed (quantizing and casting are lazy).
    """
    from tqdm import tqdm

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    weights, layer_names = _layout_names(model, dict(tree_flatten(model.parameters())))
    for key in tqdm(sorted(weights), desc="converting", unit="tensor", disable=not progress):
        mx.eval(weights[key])
    shards = _shard(weights, max_shard_bytes)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(destination / name), shard, metadata={"format": "mlx"})
        index.update({key: name for key in shard})
    total = sum(v.nbytes for v in weights.values())
    (destination / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )
    # MLX-community configs repeat the quantization as ``quantization_config``; both follow what is written.
    new_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quantization is not None:
        entry = {layer_names.get(k, k) if k not in QUANTIZATION_KEYS else k: v for k, v in quantization.items()}
        new_config["quantization"] = entry
        new_config["quantization_config"] = dict(entry)
    (destination / "config.json").write_text(json.dumps(new_config, indent=2))
    for pattern in _COMPANION_PATTERNS:
        for file in Path(source).glob(pattern):
            if file.is_file() and file.name not in _REWRITTEN | _ABOUT_THE_WEIGHTS:
                shutil.copy2(file, destination / file.name)
    return destination


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str | None = None
    """Cast floating-point weights to this (``DTYPES``); None keeps the checkpoint's."""
    quantize: QuantizeOptions | None = None
    skip_vision: bool = False
    """With ``quantize``: the vision tower stays in float."""
    dequantize: bool = False
    recipe: str | None = None
    """With ``quantize``: a named preset of per-layer settings (``recipes.RECIPES``)."""
    predicate_file: str | Path | None = None
    """With ``quantize``: a JSON of layer-path pattern -> settings or false (``recipes.plan_from_file``)."""
    max_shard_bytes: int = MAX_SHARD_BYTES
    progress: bool = False
    revision: str | None = None
    """Of a Hugging Face repo id."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConvertError(f"--dtype {self.dtype}: choose from {', '.join(DTYPES)}")
        if self.quantize is not None and self.dequantize:
            raise ConvertError("-q and --dequantize contradict each other: quantize or dequantize, not both")
        if self.skip_vision and self.quantize is None:
            raise ConvertError("--skip-vision only applies when quantizing (-q)")
        if (self.recipe or self.predicate_file) and self.quantize is None:
            raise ConvertError("--quant-recipe and --quant-predicate only apply when quantizing (-q)")
        if self.recipe and self.predicate_file:
            raise ConvertError("--quant-recipe and --quant-predicate both choose per-layer settings: give one")
        if self.recipe:
            recipe_by_name(self.recipe)
        if self.max_shard_bytes <= 0:
            raise ConvertError("the shard size must be positive")


@dataclass
class ConvertReport:
    destination: Path
    model_type: str
    tensors: int
    shards: int
    total_bytes: int
    quantized: list[str] = field(default_factory=list)
    """Layers quantized (MLX-community names)."""
    kept_float: dict[str, str] = field(default_factory=dict)
    """Quantizable layers left in float (MLX-community names) and why."""
    own_settings: dict[str, QuantizeOptions] = field(default_factory=dict)
    """Layers quantized with settings of their own, from a recipe or predicate file (MLX-community names)."""
    dequantized: int = 0


def _vision_stays_float(path: str) -> str | None:
    if not is_vision_tower(path):
        return None
    return f"{'audio' if 'audio_tower' in path.split('.') else 'vision'} tower, --skip-vision"


def _layer_plan(model: nn.Module, options: ConvertOptions) -> Callable[[str], LayerChoice] | None:
    """The per-layer settings ``options`` ask for, as a function of the layer's path (None: the same for all)."""
    assert options.quantize is not None
    paths = [path for path, module in model.named_modules() if hasattr(module, "to_quantized")]
    if options.recipe:
        plan = plan_from_recipe(options.recipe, options.quantize, paths)
    elif options.predicate_file:
        plan = plan_from_file(options.predicate_file, options.quantize)
    else:
        return None
    _, names = _layout_names(model, dict(tree_flatten(model.parameters())))
    return lambda path: plan.choose(path, names.get(path, path))


def _check_destination(source: Path, destination: Path) -> None:
    if destination.resolve() == source.resolve():
        raise ConvertError(f"--mlx-path {destination} is the source folder; write the conversion to a new folder")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ConvertError(f"--mlx-path {destination} already exists and is not empty; choose a new folder")


def convert(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], options: ConvertOptions
) -> ConvertReport:
    """Read ``source`` (a local folder or Hugging Face repo id, in any layout ``load`` reads) and write it to
    ``destination`` in the MLX-community layout, cast, quantized or dequantized as ``options`` ask."""

    source_path = resolve_model_path(source, options.revision)
    destination = Path(destination).expanduser()
    _check_destination(source_path, destination)
    config = load_config(source_path)
    arch = architecture_of(config)
    model = load_model(source_path, config, arch)
    quantized_source = is_quantized(model)
    if options.quantize is not None and quantized_source:
        raise ConvertError(f"{source} is already quantized; convert it with --dequantize first, then quantize that")
    if options.dequantize and not quantized_source:
        raise ConvertError(f"{source} is not quantized; --dequantize has nothing to undo")

    dequantized = 0
    if options.dequantize:
        dequantized = sum(isinstance(m, QUANTIZED_LAYERS) for _, m in model.named_modules())
        dequantize_model(model)
    config = dict(config)
    if options.dtype is not None:
        cast_floats(model, DTYPES[options.dtype])
        for key in ("torch_dtype", "dtype"):  # transformers 4 and 5 names for the stored precision
            if key in config:
                config[key] = options.dtype

    quantized: list[str] = []
    kept: dict[str, str] = {}
    own: dict[str, QuantizeOptions] = {}
    quantization: dict[str, Any] | None = dict(config["quantization"]) if quantized_source and not dequantized else None
    if options.quantize is not None:
        plan = _layer_plan(model, options)
        keep = _vision_stays_float if options.skip_vision else None
        quantized, kept, own = quantize_layers(model, options.quantize, keep, plan)
        if not quantized:
            raise ConvertError(
                f"no layer of {source} can be quantized with group size {options.quantize.group_size}; "
                "nothing would change (try a smaller --q-group-size)"
            )
        # Recording the float layers lets readers that go by the config alone (not by the stored scales) agree.
        # Per-layer settings are written as MLX-community checkpoints write them: the layer's name -> its entry.
        quantization = {
            **options.quantize.entry(),
            **{path: False for path in kept},
            **{path: settings.entry() for path, settings in own.items()},
        }

    save_model(
        model,
        destination,
        source=source_path,
        config=config,
        quantization=quantization,
        max_shard_bytes=options.max_shard_bytes,
        progress=options.progress,
    )
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    _, layer_names = _layout_names(model, dict(tree_flatten(model.parameters())))
    return ConvertReport(
        destination=destination,
        model_type=config["model_type"],
        tensors=len(index["weight_map"]),
        shards=len(set(index["weight_map"].values())),
        total_bytes=index["metadata"]["total_size"],
        quantized=[layer_names.get(p, p) for p in quantized],
        kept_float={layer_names.get(p, p): reason for p, reason in kept.items()},
        own_settings={layer_names.get(p, p): settings for p, settings in own.items()},
        dequantized=dequantized,
    )
