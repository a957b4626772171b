"""LoRA adapters: the layer math, which modules get them, and reading ``adapters.safetensors``.

It lives here (not in vlm_train) so that ``load(..., adapter_path=...)`` can apply an adapter without
vlm_models importing the trainer; vlm_train builds on these pieces.

An adapter folder holds ``adapter_config.json`` (a :class:`LoRAConfig` plus ``fine_tune_type``) and
``adapters.safetensors``: for LoRA the ``lora_a`` / ``lora_b`` matrices under the wrapped layers' paths, for full
fine-tuning every trained weight under its model path.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .family import FamilyModel
from .nn.fused import fuse_projections
from .nn.kernel_linear import use_matvec_kernels

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "FINE_TUNE_TYPES",
    "LoRAConfig",
    "LoRALinear",
    "TARGET_GROUPS",
    "apply_lora",
    "fuse_lora",
    "load_adapters",
    "read_adapter_config",
    "target_paths",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "qlora", "full")
TARGET_GROUPS = ("language", "vision", "projector")


class AdapterError(ValueError):
    """An adapter folder cannot be applied to this model; the message names the file at fault."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get a low-rank update ``scale * (x @ A) @ B`` with ``scale = alpha / rank``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("language",)
    """Groups of the model: ``language`` (attention and MLP projections of the decoder), ``vision`` (the vision
    tower's linear layers), ``projector`` (the vision-to-text merger)."""
    modules: tuple[str, ...] = field(default=())
    """Glob patterns over module paths (e.g. ``*.self_attn.q_proj``); when given they replace ``targets``."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(TARGET_GROUPS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(TARGET_GROUPS)}")
        if not self.targets and not self.modules:
            raise ValueError("LoRA needs at least one target group or module pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoRAConfig:
        known = {k: values[k] for k in ("rank", "alpha", "dropout") if k in values}
        for key in ("targets", "modules"):
            if key in values:
                known[key] = tuple(values[key])
        return cls(**known)


class LoRALinear(nn.Module):
    """``linear(x) + scale * (dropout(x) @ lora_a) @ lora_b`` around a frozen ``nn.Linear`` or
    ``nn.QuantizedLinear``. ``lora_b`` starts at zero, so a fresh adapter leaves the model unchanged."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        out_dims, in_dims = _linear_shape(linear)
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0) -> LoRALinear:
        return cls(linear, rank, scale, dropout)

    def delta_weight(self) -> mx.array:
        """The update as an (out, in) weight, in the adapter's dtype."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fuse(self, *, dequantize: bool = False) -> nn.Module:
        """A plain layer computing what this one computes (without dropout). A quantized base is dequantized,
        updated and quantized again with its own settings, unless ``dequantize``."""
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        weight = _dense_weight(base)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        fused.weight = (weight + self.delta_weight().astype(mx.float32)).astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        update = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * update).astype(y.dtype)


def _linear_shape(linear: nn.Module) -> tuple[int, int]:
    if isinstance(linear, nn.QuantizedLinear):
        out_dims, packed = linear.weight.shape
        return out_dims, packed * 32 // linear.bits
    if isinstance(linear, nn.Linear):
        return linear.weight.shape
    raise TypeError(f"LoRA wraps nn.Linear or nn.QuantizedLinear, not {type(linear).__name__}")


def _dense_weight(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"), linear.group_size, linear.bits, mode=linear.mode
        )
    return linear.weight


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def target_paths(model: FamilyModel, config: LoRAConfig) -> list[str]:
    """Paths of the linear layers ``config`` selects, in model order."""
    groups = model.adapter_groups
    paths = []
    for path, module in model.named_modules():
        if not _is_linear(module):
            continue
        if config.modules:
            chosen = any(fnmatch.fnmatchcase(path, pattern) for pattern in config.modules)
        else:
            chosen = _group_of(path, groups) in config.targets
        if chosen:
            paths.append(path)
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


def _group_of(path: str, groups: Mapping[str, tuple[str, ...]]) -> str | None:
    """The group with the longest prefix of ``path``: the projector inside the vision tower is the projector's."""
    best, best_len = None, -1
    for name, prefixes in groups.items():
        for prefix in prefixes:
            if path.startswith(prefix) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the selected layers, in place, in :class:`LoRALinear`; returns their paths."""
    paths = target_paths(model, config)
    if not paths:
        raise AdapterError(f"no linear layer matches the LoRA targets {config.targets or config.modules}")
    modules = dict(model.named_modules())
    wrapped = [(p, LoRALinear.from_base(modules[p], config.rank, config.scale, config.dropout)) for p in paths]
    model.update_modules(tree_unflatten(wrapped))
    return paths


def fuse_lora(model: nn.Module, *, dequantize: bool = False) -> int:
    """Replace, in place, every :class:`LoRALinear` by its fused layer; returns how many were fused."""
    fused = [(path, m.fuse(dequantize=dequantize)) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
        use_matvec_kernels(model)  # the merged layers are new: kernel-backed and fused again, as after loading
        fuse_projections(model)
    return len(fused)


def read_adapter_config(adapter_path: str | Path) -> tuple[str, LoRAConfig | None, dict[str, Any]]:
    """``(fine_tune_type, lora_config or None for full fine-tuning, the whole json)``."""
    folder = Path(adapter_path)
    file = folder / ADAPTER_CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG_FILE}; is it an adapter folder written by vlm train?")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file} is not valid JSON: {exc}") from None
    kind = values.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise AdapterError(f"{file}: unknown fine_tune_type {kind!r} (known: {', '.join(FINE_TUNE_TYPES)})")
    if kind == "full":
        return kind, None, values
    try:
        return kind, LoRAConfig.from_dict(values.get("lora") or {}), values
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{file}: {exc}") from None


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapter in ``adapter_path`` to ``model`` in place (LoRA layers wrapped, or full weights
    replaced). Every stored tensor must fit the model; a mismatch names the first key at fault."""
    folder = Path(adapter_path)
    _kind, lora, values = read_adapter_config(folder)
    file = folder / ADAPTER_WEIGHTS_FILE
    if not file.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS_FILE}")
    try:
        weights = mx.load(str(file))
    except Exception as exc:  # mlx raises bare RuntimeError/ValueError for corrupt files
        raise AdapterError(f"cannot read {file}: {exc}") from None
    quantization = values.get("base_quantization")
    if quantization and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        # QLoRA quantized a float base before training; the adapter belongs to that quantized model.
        from .quantize import quantize_model

        quantize_model(model, bits=int(quantization["bits"]), group_size=int(quantization["group_size"]))
    if lora is not None:
        apply_lora(model, lora)
    expected = dict(tree_flatten(model.parameters()))
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise AdapterError(f"{file}: {len(unknown)} tensor(s) fit no layer of this model, e.g. {unknown[0]}")
    if lora is not None:
        wanted = {k for k in expected if k.endswith((".lora_a", ".lora_b"))}
        missing = sorted(wanted - set(weights))
        if missing:
            raise AdapterError(f"{file} lacks {len(missing)} LoRA tensor(s), e.g. {missing[0]}")
    wrong = sorted(k for k in weights if weights[k].shape != expected[k].shape)
    if wrong:
        k = wrong[0]
        raise AdapterError(
            f"{file}: {k} has shape {tuple(weights[k].shape)} but the model expects {tuple(expected[k].shape)};"
            " was the adapter trained on another model?"
        )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model
