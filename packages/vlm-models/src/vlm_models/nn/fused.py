"""Projections that read the same input fused into one product: q/k/v of an attention, gate/up of a gated MLP.

At decode every product is a kernel launch that reads its weight once; three small ones (q and the narrow k, v)
cost three launches and three ramp-ups of the memory system for one input. ``fuse_projections`` concatenates the
weights (quantized or float, biases too) along the outputs once, at load, and makes each layer's own parameters
views into the fused arrays: memory does not grow, the layers keep their names and shapes (checkpoints save
unchanged, adapters still find ``q_proj``), and a layer whose weight was replaced later (an adapter merged, a
re-quantization) is noticed by identity and the layers run separately again, never on stale weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

__all__ = ["FusedLinears", "fuse_linears", "fuse_projections", "unfuse_projections"]

_PARTS = ("weight", "scales", "biases", "bias")


@dataclass
class FusedLinears:
    """The fused product of ``layers`` (which share their input), or None per call where they drifted apart."""

    layers: tuple[nn.Module, ...]
    fused: nn.Module
    views: tuple[tuple[mx.array, ...], ...]
    splits: tuple[int, ...]

    def _same(self, layer: nn.Module, views: tuple[mx.array, ...]) -> bool:
        own = [layer[p] for p in _PARTS if p in layer]
        return len(own) == len(views) and all(a is b for a, b in zip(own, views))

    def __call__(self, x: mx.array, current: Sequence[nn.Module]) -> list[mx.array] | None:
        """The layers' outputs, or None where ``current`` (the owner's layers now) are no longer the fused ones
        or hold other arrays."""
        if any(now is not layer for now, layer in zip(current, self.layers)):
            return None
        if not all(self._same(layer, view) for layer, view in zip(self.layers, self.views)):
            return None
        y = self.fused(x)
        return mx.split(y, list(self.splits), axis=-1)


def _kind(layer: nn.Module) -> tuple | None:
    if type(layer) is nn.Linear:
        return ("linear", layer.weight.dtype, "bias" in layer)
    if isinstance(layer, nn.QuantizedLinear) and layer.mode == "affine":
        return ("quantized", layer.bits, layer.group_size, layer.scales.dtype, "bias" in layer)
    return None


def fuse_linears(layers: Sequence[nn.Module]) -> FusedLinears | None:
    """Fuse ``layers`` (plain or affine-quantized linears of one kind and input width), or None where they differ
    (kind, width, bias) or are wrapped (an adapter)."""
    kinds = {_kind(layer) for layer in layers}
    if len(kinds) != 1 or None in kinds or len({layer.weight.shape[1] for layer in layers}) != 1:
        return None
    first = layers[0]
    present = [p for p in _PARTS if p in first]
    joined = {p: mx.concatenate([layer[p] for layer in layers], axis=0) for p in present}
    mx.eval(list(joined.values()))
    # The same layer class over the joined arrays (a kernel-backed one stays kernel-backed).
    kind = type(first)
    fused = kind.__new__(kind)
    nn.Module.__init__(fused)
    if isinstance(first, nn.QuantizedLinear):
        fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
    for p, value in joined.items():
        fused[p] = value
    widths = [layer.weight.shape[0] for layer in layers]
    start, views = 0, []
    for layer, width in zip(layers, widths):
        for p in present:
            layer[p] = joined[p][start : start + width]
        views.append(tuple(layer[p] for p in present))
        start += width
    mx.eval([v for vs in views for v in vs])
    splits = tuple(sum(widths[: i + 1]) for i in range(len(widths) - 1))
    return FusedLinears(tuple(layers), fused, tuple(views), splits)


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, the q/k/v projections of every shared ``Attention`` and the gate/up ones of every
    ``GatedMLP`` of ``model`` (again after its layers were replaced); returns how many groups were fused."""
    from .layers import Attention, GatedMLP

    count = 0
    for _, module in model.named_modules():
        if isinstance(module, Attention):
            module._qkv = fuse_linears([module.q_proj, module.k_proj, module.v_proj])
            count += module._qkv is not None
        elif isinstance(module, GatedMLP):
            module._gate_up = fuse_linears([module.gate_proj, module.up_proj])
            count += module._gate_up is not None
    return count


def unfuse_projections(model: nn.Module) -> None:
    """Run every projection on its own again (benchmarks: the before of a before/after); parameters untouched."""
    from .layers import Attention, GatedMLP

    for _, module in model.named_modules():
        if isinstance(module, Attention):
            module._qkv = None
        elif isinstance(module, GatedMLP):
            module._gate_up = None
