"""Activation quantization: the mxfp8 and nvfp4 linear layers of a checkpoint swapped for MLX's ``nn.QQLinear``,
which quantizes each input to the weights' format and multiplies in it (``mx.qqmm``: the tensor-core path of
GPUs that have one). Weight-only layers compute in float; these trade a little accuracy for that path.

Where MLX cannot run ``qqmm`` (the check below asks it: MLX 0.32.4's CPU multiplies single rows only, so a
prompt could not be prefilled) the swap is refused in one line; layers with a bias (``QQLinear`` has none), the
stacked experts and the embeddings stay weight-only and are named."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

__all__ = [
    "ACTIVATION_MODES",
    "ActivationQuantError",
    "ActivationReport",
    "backend_refusal",
    "quantize_activations",
    "resolve_activation_quantization",
]

ACTIVATION_MODES = ("mxfp8", "nvfp4")
"""The formats ``mx.qqmm`` quantizes activations to (MLX 0.32.4)."""


class ActivationQuantError(ValueError):
    """Activation quantization asked for where it cannot apply; the message says why, in one line."""


@dataclass
class ActivationReport:
    swapped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Quantized layers of an activation format left weight-only, and why."""
    modes: set[str] = field(default_factory=set)

    def notice(self) -> str:
        modes = sorted(self.modes)
        line = f"activation quantization ({', '.join(modes)}, nn.QQLinear): {len(self.swapped)} linear layers"
        if self.kept:
            shown = ", ".join(sorted(self.kept)[:4]) + (f" and {len(self.kept) - 4} more" if len(self.kept) > 4 else "")
            reasons = ", ".join(sorted(set(self.kept.values())))
            line += f"; weight-only ({reasons}): {shown}"
        return line


def backend_refusal(mode: str, device: mx.Device | None = None) -> str | None:
    """Why MLX cannot multiply activation-quantized in ``mode`` on ``device`` (the default one), or None where it
    can. Asked of MLX itself with a two-row product: a prompt's prefill multiplies many rows at once."""
    device = device or mx.default_device()
    w = mx.quantize(mx.ones((8, 64)), mode=mode)
    try:
        mx.eval(mx.qqmm(mx.ones((2, 64)), w[0], scales=w[1], mode=mode, stream=device))
    except (RuntimeError, ValueError) as exc:
        kind = "cpu" if device.type == mx.cpu else "gpu"
        return f"MLX {mx.__version__} cannot quantize activations on the {kind} ({mode}: {exc})"
    return None


def _activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear) and getattr(m, "mode", "affine") in ACTIVATION_MODES
    ]


def _weight_only_in_activation_modes(model: nn.Module) -> dict[str, str]:
    """Quantized layers in an activation format that ``QQLinear`` cannot take (it is a plain linear layer)."""
    kept = {}
    for path, m in model.named_modules():
        if (
            getattr(m, "mode", None) in ACTIVATION_MODES
            and hasattr(m, "scales")
            and not isinstance(m, nn.QuantizedLinear)
        ):
            kept[path] = "embedding" if isinstance(m, nn.QuantizedEmbedding) else "stacked experts"
    return kept


def as_qq_linear(layer: nn.QuantizedLinear) -> nn.QQLinear:
    """The same packed weight and scales behind ``QQLinear`` (nothing is re-quantized)."""
    out_dims, packed = layer.weight.shape
    qq = nn.QQLinear(packed * 32 // layer.bits, out_dims, layer.group_size, layer.bits, mode=layer.mode)
    qq.weight, qq.scales = layer.weight, layer.scales
    qq._quantized = True  # its weight is packed already: eval() must not quantize it again
    qq.eval()
    return qq


def quantize_activations(model: nn.Module, *, check_backend: bool = True) -> ActivationReport:
    """Swap, in place, every bias-free mxfp8 / nvfp4 linear layer of ``model`` for ``QQLinear``."""
    layers = _activation_layers(model)
    if not layers:
        raise ActivationQuantError(
            f"activation quantization applies to {' and '.join(ACTIVATION_MODES)} checkpoints; this model has no "
            "linear layer in either (convert it with `vlm convert -q --q-mode mxfp8` or nvfp4)"
        )
    report = ActivationReport(kept=_weight_only_in_activation_modes(model))
    report.modes = {m.mode for _, m in layers}
    if check_backend:
        for mode in sorted(report.modes):
            reason = backend_refusal(mode)
            if reason is not None:
                raise ActivationQuantError(reason)
    swaps = []
    for path, layer in layers:
        if "bias" in layer:
            report.kept[path] = "bias"
            continue
        swaps.append((path, as_qq_linear(layer)))
        report.swapped.append(path)
    model.update_modules(tree_unflatten(swaps))
    return report


def on_cuda() -> bool:
    return mx.default_device().type == mx.gpu and mx.cuda.is_available()


def resolve_activation_quantization(model: nn.Module, requested: bool | None) -> ActivationReport | None:
    """``load``'s ``quantize_activations``: True swaps (or refuses, in one line), False leaves the model as it is,
    None swaps where the backend needs it (CUDA, for a checkpoint with mxfp8 / nvfp4 linear layers), with a one-line
    notice on stderr."""
    if requested is False:
        return None
    if requested is None:
        if not (on_cuda() and _activation_layers(model)):
            return None
        try:
            report = quantize_activations(model)
        except ActivationQuantError as exc:
            print(f"vlm: {exc}; the layers stay weight-only", file=sys.stderr)
            return None
        print(f"vlm: {report.notice()} (on by default on CUDA; --no-quantize-activations keeps them)", file=sys.stderr)
        return report
    report = quantize_activations(model)
    if report.kept:
        print(f"vlm: {report.notice()}", file=sys.stderr)
    return report
