"""Quantizing, dequantizing and re-quantizing loaded models: the formats MLX offers (affine, mxfp4, mxfp8,
nvfp4), which layers can take them, and the float dtype a quantized model keeps. ``convert`` writes the result;
``load`` applies a checkpoint's ``quantization`` entry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .family import FamilyModel
from .nn.fused import fuse_projections
from .nn.kernel_linear import use_matvec_kernels
from .nn.moe import QuantizedSwitchLinear, SwitchLinear

__all__ = [
    "MODE_RULES",
    "QuantizeError",
    "QuantizeOptions",
    "apply_quantization",
    "dequantize_model",
    "is_quantized",
    "quantize_layers",
    "quantize_model",
]

# Module names under which the families keep their vision towers (HF and MLX-community names alike).
VISION_TOWER_NAMES = frozenset({"visual", "vision_tower", "vision_model", "audio_tower", "vision_embedder"})
"""Module names of the media towers (vision, and audio for families that hear; the unified Gemma 4's patch
projection in place of a tower), which --skip-vision keeps float."""


class QuantizeError(ValueError):
    """Quantization settings that cannot be applied; the message says why, in one line."""


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
            raise QuantizeError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODE_RULES)})")
        fixed = len(rule.bits) == 1
        default_bits, default_group = (rule.bits[0], rule.group_sizes[0]) if fixed else _AFFINE_DEFAULTS
        bits = default_bits if bits is None else bits
        group_size = default_group if group_size is None else group_size
        if bits not in rule.bits:
            allowed = "is fixed at" if fixed else "must be one of"
            raise QuantizeError(f"--q-bits {bits}: {mode} bits {allowed} {', '.join(map(str, rule.bits))}")
        if group_size not in rule.group_sizes:
            allowed = "is fixed at" if fixed else "must be one of"
            raise QuantizeError(
                f"--q-group-size {group_size}: {mode} group size {allowed} {', '.join(map(str, rule.group_sizes))}"
            )
        return cls(bits=bits, group_size=group_size, mode=mode)

    def entry(self) -> dict[str, Any]:
        """The ``quantization`` entry of config.json, before any per-layer exceptions."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def _stored_shape(model: nn.Module, key: str, value: mx.array) -> tuple[int, ...] | None:
    """The shape the MLX-community layout stores ``key`` in (None where the model has no such layout)."""
    stored = model.mlx_community_names({key: value})
    return tuple(next(iter(stored.values())).shape) if len(stored) == 1 else None


def float_reason(model: FamilyModel, path: str, module: nn.Module, group_size: int) -> str | None:
    """Why the layer at ``path`` cannot be quantized with ``group_size``, or None where it can."""
    own = model.keeps_float(path)  # a family's own reasons (Gemma 4's expert routers)
    if own is not None:
        return own
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
    model: nn.Module,
    options: QuantizeOptions,
    keep_float: Callable[[str], str | None] | None = None,
    layer_options: Callable[[str], QuantizeOptions | Literal[False] | None] | None = None,
) -> tuple[list[str], dict[str, str], dict[str, QuantizeOptions]]:
    """Quantize, in place, every linear and embedding layer that can be; returns the quantized layers' paths, for
    each layer left in float why (``keep_float(path)`` may give a reason of its own), and the layers quantized with
    settings of their own (``layer_options(path)``: their options, ``False`` to keep float, None for ``options``)."""
    quantized: list[str] = []
    kept: dict[str, str] = {}
    own: dict[str, QuantizeOptions] = {}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        choice = layer_options(path) if layer_options else None
        settings = choice or options
        reason = (keep_float(path) if keep_float else None) or float_reason(model, path, module, settings.group_size)
        if reason is None and choice is False:
            reason = "kept float by the quantization recipe"
        if reason is not None:
            kept[path] = reason
            return False
        quantized.append(path)
        if not choice or choice == options:
            return True
        own[path] = choice
        return choice.entry()

    dtype = _model_float_dtype(model)
    nn.quantize(model, group_size=options.group_size, bits=options.bits, mode=options.mode, class_predicate=predicate)
    keep_embedding_dtype(model, dtype)
    use_matvec_kernels(model)
    fuse_projections(model)  # the quantized layers are new: fuse them again
    return quantized, kept, own


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
        fuse_projections(model)  # the float layers are new: fuse them again (and let the quantized fusion go)
    return model


def apply_quantization(model: nn.Module, quantization: Mapping[str, Any], weights: Mapping[str, mx.array]) -> None:
    """Swap in quantized layers wherever the checkpoint stores quantized weights (``<path>.scales``), with a
    layer's own settings where ``quantization`` has an entry for its path (``false``: the layer stays float)."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        override = quantization.get(path)
        if override is False or f"{path}.scales" not in weights:
            return False
        return {**defaults, **override} if isinstance(override, dict) else True

    # None lets MLX pick the mode's own group size and width (mxfp4, nvfp4, ... fix them).
    nn.quantize(
        model,
        group_size=defaults.get("group_size"),
        bits=defaults.get("bits"),
        mode=defaults.get("mode", "affine"),
        class_predicate=predicate,
    )
    keep_embedding_dtype(model, float_dtype(weights.values()))
    use_matvec_kernels(model)
