"""Converting checkpoints: quantizing or dequantizing a loaded model and writing it in the MLX-community layout
(the layout ``load`` also reads). ``convert`` is what ``vlm convert`` runs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .nn.moe import QuantizedSwitchLinear, SwitchLinear

__all__ = [
    "ConvertError",
    "ConvertOptions",
    "ConvertReport",
    "QuantizeOptions",
    "convert",
    "dequantize_model",
    "quantize_model",
    "save_model",
]

MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANTIZATION_KEYS = ("group_size", "bits", "mode")
# What travels with the weights: tokenizer, processor, chat template and generation settings (every layout's
# names); config.json and the weight index are written anew.
_COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
_REWRITTEN = {"config.json", "model.safetensors.index.json"}
# Module names under which the families keep their vision towers (HF and MLX-community names alike).
VISION_TOWER_NAMES = frozenset({"visual", "vision_tower", "vision_model"})


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why, in one line."""


@dataclass(frozen=True)
class _ModeRule:
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]


# mx.quantize (MLX 0.32): the microscaling and NVIDIA formats fix both their element width and group size.
MODE_RULES = {
    "affine": _ModeRule(bits=(2, 3, 4, 5, 6, 8), group_sizes=(32, 64, 128)),
    "mxfp4": _ModeRule(bits=(4,), group_sizes=(32,)),
    "mxfp8": _ModeRule(bits=(8,), group_sizes=(32,)),
    "nvfp4": _ModeRule(bits=(4,), group_sizes=(16,)),
}
_AFFINE_DEFAULTS = (4, 64)


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    @classmethod
    def for_mode(cls, mode: str = "affine", bits: int | None = None, group_size: int | None = None) -> QuantizeOptions:
        """Options with the mode's defaults filled in; a width or group size the mode does not allow is refused."""
        rule = MODE_RULES.get(mode)
        if rule is None:
            raise ConvertError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODE_RULES)})")
        fixed = len(rule.bits) == 1
        default_bits, default_group = (rule.bits[0], rule.group_sizes[0]) if fixed else _AFFINE_DEFAULTS
        bits = default_bits if bits is None else bits
        group_size = default_group if group_size is None else group_size
        if bits not in rule.bits:
            allowed = "is fixed at" if fixed else "must be one of"
            raise ConvertError(f"--q-bits {bits}: {mode} bits {allowed} {', '.join(map(str, rule.bits))}")
        if group_size not in rule.group_sizes:
            allowed = "is fixed at" if fixed else "must be one of"
            raise ConvertError(
                f"--q-group-size {group_size}: {mode} group size {allowed} {', '.join(map(str, rule.group_sizes))}"
            )
        return cls(bits=bits, group_size=group_size, mode=mode)

    def entry(self) -> dict[str, Any]:
        """The ``quantization`` entry of config.json, before any per-layer exceptions."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def _stored_shape(model: nn.Module, key: str, value: mx.array) -> tuple[int, ...] | None:
    """The shape the MLX-community layout stores ``key`` in (None where the model has no such layout)."""
    rename = getattr(model, "mlx_community_names", None)
    if rename is None:
        return tuple(value.shape)
    stored = rename({key: value})
    return tuple(next(iter(stored.values())).shape) if len(stored) == 1 else None


def float_reason(model: nn.Module, path: str, module: nn.Module, group_size: int) -> str | None:
    """Why the layer at ``path`` cannot be quantized with ``group_size``, or None where it can."""
    # A family may keep layers float for its own reasons (Gemma 4's expert routers).
    own = getattr(model, "keeps_float", None)
    if own is not None and (reason := own(path)) is not None:
        return reason
    width = module.weight.shape[-1]
    dims = 3 if isinstance(module, SwitchLinear) else 2  # stacked experts: [experts, out, in]
    if module.weight.ndim != dims:
        return f"its weight has {module.weight.ndim} dimensions, not {dims}"
    if width % group_size:
        return f"input width {width} is not a multiple of the group size {group_size}"
    # A layer the layout stores in another form (Qwen's patch embedding is a 5-D convolution there) must stay a
    # float tensor, or readers of that layout would get packed integers where they expect a kernel.
    if _stored_shape(model, f"{path}.weight", module.weight) != tuple(module.weight.shape):
        return "the MLX-community layout stores its weight in another shape"
    return None


def is_vision_tower(path: str) -> bool:
    return not VISION_TOWER_NAMES.isdisjoint(path.split("."))


def quantize_layers(
    model: nn.Module, options: QuantizeOptions, keep_float: Callable[[str], str | None] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Quantize, in place, every linear and embedding layer that can be; returns the quantized layers' paths and,
    for each layer left in float, why (``keep_float(path)`` may give a reason of its own)."""
    quantized: list[str] = []
    kept: dict[str, str] = {}

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized"):
            return False
        reason = (keep_float(path) if keep_float else None) or float_reason(model, path, module, options.group_size)
        if reason is not None:
            kept[path] = reason
            return False
        quantized.append(path)
        return True

    dtype = _model_float_dtype(model)
    nn.quantize(model, group_size=options.group_size, bits=options.bits, mode=options.mode, class_predicate=predicate)
    keep_embedding_dtype(model, dtype)
    return quantized, kept


def quantize_model(model: nn.Module, *, bits: int = 4, group_size: int = 64, mode: str = "affine") -> dict[str, Any]:
    """Quantize, in place, every linear and embedding layer that can be quantized with these settings.

    Returns the ``quantization`` entry for config.json. Layers that cannot be quantized stay in float.
    """
    options = QuantizeOptions(bits=bits, group_size=group_size, mode=mode)
    quantize_layers(model, options)
    return options.entry()


QUANTIZED_LAYERS = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_LAYERS) for _, m in model.named_modules())


def float_dtype(arrays: Iterable[mx.array]) -> mx.Dtype:
    """The most common floating-point dtype among ``arrays`` (by element count; float32 where there is none)."""
    counts: dict[mx.Dtype, int] = {}
    for a in arrays:
        if mx.issubdtype(a.dtype, mx.floating):
            counts[a.dtype] = counts.get(a.dtype, 0) + a.size
    return max(counts, key=counts.__getitem__) if counts else mx.float32


def _model_float_dtype(model: nn.Module) -> mx.Dtype:
    return float_dtype(p for _, p in tree_flatten(model.parameters()))


class FloatQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding that returns the model's float dtype. MLX's returns bfloat16 in the fp modes (their
    integer scales carry no float type), which would turn a float32 model's residual stream into bfloat16; the
    fp modes' values are exact in bfloat16, so the cast loses nothing."""

    output_dtype: mx.Dtype = mx.float32

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x).astype(self.output_dtype)


def keep_embedding_dtype(model: nn.Module, dtype: mx.Dtype) -> None:
    """Make the fp-mode quantized embeddings of ``model`` return ``dtype`` (affine ones already return their
    scales' dtype)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedEmbedding and module.mode != "affine":
            module.__class__ = FloatQuantizedEmbedding  # same parameters, no re-quantizing of a large table
            module.output_dtype = dtype


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every quantized linear and embedding layer by its float equivalent, in the dtype of the
    model's other float parameters (the fp modes' integer scales carry none, and MLX would pick bfloat16)."""
    dtype = _model_float_dtype(model)

    def dequantized_weight(q: nn.Module) -> mx.array:
        return mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, mode=q.mode, dtype=dtype)

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
        elif isinstance(module, QuantizedSwitchLinear):
            replacements.append((path, module.to_float(dtype)))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return model


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (quantized weights and integer scales stay as they are)."""
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def _layout_names(model: nn.Module, params: Mapping[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The weights under their MLX-community names, and each of our layer paths' name in that layout."""
    rename = getattr(model, "mlx_community_names", None)
    if rename is None:
        return dict(params), {}
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
            if file.is_file() and file.name not in _REWRITTEN:
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
    dequantized: int = 0


def _vision_stays_float(path: str) -> str | None:
    return "vision tower, --skip-vision" if is_vision_tower(path) else None


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
    from .loading import load_config, load_model, resolve_model_path
    from .registry import architecture_of

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
    quantization: dict[str, Any] | None = dict(config["quantization"]) if quantized_source and not dequantized else None
    if options.quantize is not None:
        quantized, kept = quantize_layers(model, options.quantize, _vision_stays_float if options.skip_vision else None)
        if not quantized:
            raise ConvertError(
                f"no layer of {source} can be quantized with group size {options.quantize.group_size}; "
                "nothing would change (try a smaller --q-group-size)"
            )
        # Recording the float layers lets readers that go by the config alone (not by the stored scales) agree.
        quantization = {**options.quantize.entry(), **{path: False for path in kept}}

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
        dequantized=dequantized,
    )
