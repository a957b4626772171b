"""Sparse mixture-of-experts MLPs: a router picks ``top_k`` of ``num_experts`` gated MLPs per token.

The experts' weights are stacked (``[experts, out, in]``) and applied with ``mx.gather_mm`` (``gather_qmm`` once
quantized), so a step costs a few fused kernels whatever the number of experts, never a Python loop over them.
``expert_weights`` maps the checkpoint layouts of stacked experts onto these modules' names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .layers import GatedMLP, gated_activation

__all__ = [
    "ExpertLayouts",
    "MoEConfig",
    "QuantizedSwitchLinear",
    "SparseMoE",
    "SwitchGLU",
    "SwitchLinear",
    "expert_weights",
    "mlx_community_expert_names",
]

# Above this many (token, expert) pairs, the pairs are sorted by expert first: each expert's weights are then read
# once per run of its tokens (prefill); below it (decode) the sort costs more than it saves.
SORT_THRESHOLD = 64


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' router probabilities to sum to one."""
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    """Width of an always-on gated MLP added to the experts' output, scaled by a sigmoid gate (Qwen2-MoE,
    Qwen3-Next, Qwen3.5-MoE); 0 for none."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and num_experts {self.num_experts}"
            )
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be at least 1, not {self.decoder_sparse_step}")

    def is_sparse(self, layer: int) -> bool:
        """Qwen-MoE's rule: every ``decoder_sparse_step``-th layer is sparse, except those in ``mlp_only_layers``."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class SwitchLinear(nn.Module):
    """``num_experts`` bias-free linear layers in one ``[experts, out, in]`` weight; each input row goes through
    the experts its indices name."""

    def __init__(self, dims: int, out: int, num_experts: int) -> None:
        super().__init__()
        scale = math.sqrt(1 / dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out, dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self.weight
        if weight.dtype != mx.float32 and mx.default_device().type == mx.DeviceType.cpu:
            return self._float32_on_cpu(x, indices, sorted_indices)
        return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def _float32_on_cpu(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """MLX's CPU gather_mm takes float32 only. Sorted (prefill) dispatch casts all the experts once; the
        per-token one (decode) casts only the chosen experts' weights."""
        if sorted_indices:
            weight = self.weight.astype(mx.float32).swapaxes(-1, -2)
            out = mx.gather_mm(x.astype(mx.float32), weight, rhs_indices=indices, sorted_indices=True)
        else:
            chosen = self.weight[indices].astype(mx.float32)  # (..., k, out, in)
            out = x.astype(mx.float32) @ chosen.swapaxes(-1, -2)
        return out.astype(x.dtype)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine") -> nn.Module:
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """``SwitchLinear`` with its weight quantized along the input axis, as ``nn.QuantizedLinear`` does."""

    def __init__(self, weight: mx.array, group_size: int | None, bits: int | None, mode: str) -> None:
        super().__init__()
        parts = mx.quantize(weight, group_size, bits, mode=mode)
        self.weight, self.scales = parts[0], parts[1]
        if len(parts) > 2:
            self.biases = parts[2]
        # Read back from the packed shapes: MLX fills in the mode's own group size and width where they are None.
        self.group_size = weight.shape[-1] // self.scales.shape[-1]
        self.bits = self.weight.shape[-1] * 32 // weight.shape[-1]
        self.mode = mode
        self.freeze()

    @classmethod
    def from_switch_linear(
        cls, layer: SwitchLinear, group_size: int | None, bits: int | None, mode: str = "affine"
    ) -> QuantizedSwitchLinear:
        return cls(layer.weight, group_size, bits, mode)

    def to_float(self, dtype: mx.Dtype) -> SwitchLinear:
        weight = mx.dequantize(
            self.weight, self.scales, self.get("biases"), self.group_size, self.bits, mode=self.mode, dtype=dtype
        )
        layer = SwitchLinear(weight.shape[-1], weight.shape[-2], weight.shape[0])
        layer.weight = weight
        return layer

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def _sorted_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """One row per (token, choice), ordered by expert: the rows, their experts, and the order that undoes it."""
    top_k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    rows = x.reshape(-1, 1, x.shape[-1])[order // top_k]
    return rows, flat[order], mx.argsort(order)


class SwitchGLU(nn.Module):
    """The experts' gated MLPs, down(act(gate(x)) * up(x)), stacked; names follow the per-expert MLPs'."""

    def __init__(self, dims: int, hidden: int, num_experts: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden, num_experts)
        self.up_proj = SwitchLinear(dims, hidden, num_experts)
        self.down_proj = SwitchLinear(hidden, dims, num_experts)
        self._gated = gated_activation(act)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """``x`` (..., dims) and ``indices`` (..., k): each token through each of its k experts, (..., k, dims)."""
        lead = indices.shape
        sort = indices.size >= SORT_THRESHOLD
        if sort:
            rows, experts, undo = _sorted_by_expert(x, indices)
        else:
            # (..., 1, 1, dims) against (..., k) indices: the token row broadcasts over its k experts.
            rows, experts, undo = mx.expand_dims(x, (-2, -3)), indices, None
        hidden = self._gated(self.gate_proj(rows, experts, sort), self.up_proj(rows, experts, sort))
        out = self.down_proj(hidden, experts, sort)
        if sort:
            out = out[undo]
        return out.reshape(*lead, out.shape[-1])


class SparseMoE(nn.Module):
    """A linear router (``gate``) over the experts; each token's output is its top-k experts' outputs weighted by
    their (softmax) router probabilities, plus the shared expert's where the config has one."""

    def __init__(self, dims: int, config: MoEConfig, act: str = "silu") -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(dims, config.num_experts, bias=False)
        self.experts = SwitchGLU(dims, config.moe_intermediate_size, config.num_experts, act)
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(dims, config.shared_expert_intermediate_size, act)
            self.shared_expert_gate = nn.Linear(dims, 1, bias=False)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's chosen experts (..., k) and their weights (..., k)."""
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)
        chosen = mx.stop_gradient(mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :])
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return chosen, weights

    def __call__(self, x: mx.array) -> mx.array:
        chosen, weights = self.route(x)
        out = self.experts(x, chosen)
        out = (out * weights[..., None].astype(out.dtype)).sum(axis=-2)
        if "shared_expert" in self:
            out = out + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# -- checkpoint layouts

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<name>gate_proj|up_proj|down_proj)\.weight$")


def _oriented(value: mx.array, out: int, dims: int) -> mx.array:
    """A stacked projection as ``[experts, out, dims]``. transformers 5 stores that; the published transformers 4
    checkpoints store ``[experts, dims, out]``. As in transformers' loader, a tensor already of the expected shape
    is taken as it is (a square one included)."""
    if tuple(value.shape[1:]) == (out, dims):
        return value
    if tuple(value.shape[1:]) == (dims, out):
        return value.swapaxes(1, 2)
    raise ValueError(
        f"stacked expert weight of shape {tuple(value.shape)} fits neither ({out}, {dims}) nor its transpose"
    )


def expert_weights(weights: Mapping[str, mx.array], *, hidden: int, intermediate: int) -> dict[str, mx.array]:
    """``weights`` with every layout of stacked experts under ``SwitchGLU``'s names (``<...>.experts.gate_proj.
    weight`` and so on, each ``[experts, out, in]``); other keys unchanged. Pure and idempotent.

    The layouts: fused ``experts.gate_up_proj`` (gate rows, then up rows) and ``experts.down_proj`` (transformers 4
    and 5, see ``_oriented``); one MLP per expert, ``experts.<i>.gate_proj.weight`` ...; and the MLX-community
    ``switch_mlp.<name>.*`` (quantized included)."""
    out: dict[str, mx.array] = {}
    per_expert: dict[tuple[str, str], dict[int, mx.array]] = {}
    for key, value in weights.items():
        if match := _PER_EXPERT.match(key):
            per_expert.setdefault((match["prefix"], match["name"]), {})[int(match["expert"])] = value
        elif key.endswith(".experts.gate_up_proj"):
            fused = _oriented(value, 2 * intermediate, hidden)
            prefix = key.removesuffix("gate_up_proj")
            out[prefix + "gate_proj.weight"] = fused[:, :intermediate]
            out[prefix + "up_proj.weight"] = fused[:, intermediate:]
        elif key.endswith(".experts.down_proj"):
            out[key + ".weight"] = _oriented(value, hidden, intermediate)
        elif ".switch_mlp." in key:
            out[key.replace(".switch_mlp.", ".experts.")] = value
        else:
            out[key] = value
    for (prefix, name), experts in per_expert.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"{prefix}.<i>.{name}: experts {sorted(experts)} are not numbered 0..{len(experts) - 1}")
        out[f"{prefix}.{name}.weight"] = mx.stack([experts[i] for i in range(len(experts))])
    return out


def mlx_community_expert_names(key: str) -> str:
    """The MLX-community name of one of our expert tensors (the inverse of ``expert_weights`` on that layout)."""
    return key.replace(".experts.", ".switch_mlp.") if any(f".experts.{p}." in key for p in _PROJECTIONS) else key


class ExpertLayouts:
    """Mixed into a family model whose text config has ``moe``: ``sanitize`` also maps every stacked-expert layout
    onto ``SwitchGLU``'s names, ``mlx_community_names`` writes them as ``switch_mlp``."""

    config: Any

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        text = self.config.text
        assert text.moe is not None
        sanitized = super().sanitize(weights)  # type: ignore[misc]
        return expert_weights(sanitized, hidden=text.hidden_size, intermediate=text.moe.moe_intermediate_size)

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        return {mlx_community_expert_names(k): v for k, v in super().mlx_community_names(weights).items()}  # type: ignore[misc]
