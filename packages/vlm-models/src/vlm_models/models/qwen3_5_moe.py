"""Qwen3.5-MoE (Qwen3.5-35B-A3B, Qwen3.5-122B-A10B, Qwen3.5-397B-A17B): Qwen3.5 whose every decoder MLP is a sparse
mixture of experts plus a shared expert behind a sigmoid gate (nn/moe.py).

Only the experts differ from Qwen3.5: their config, and their checkpoint layouts (fused ``gate_up_proj``, one MLP
per expert, MLX-community ``switch_mlp``), which ``sanitize`` maps onto ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ..config import ConfigError
from ..nn.moe import ExpertLayouts, MoEConfig
from . import qwen3_5

TEXT_DEFAULTS: dict[str, Any] = {
    # transformers 5.25's Qwen3_5MoeTextConfig defaults where they differ from the dense model's.
    **{k: v for k, v in qwen3_5.TEXT_DEFAULTS.items() if k != "intermediate_size"},
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "num_key_value_heads": 2,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
}


def moe_config(text: Mapping[str, Any]) -> MoEConfig:
    """Every layer sparse and the chosen experts' probabilities renormalised, as transformers builds this family
    whatever ``decoder_sparse_step``, ``mlp_only_layers`` or ``norm_topk_prob`` say."""
    try:
        return MoEConfig(
            num_experts=int(text["num_experts"]),
            num_experts_per_tok=int(text["num_experts_per_tok"]),
            moe_intermediate_size=int(text["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(text["shared_expert_intermediate_size"]),
        )
    except ValueError as exc:
        raise ConfigError(f"qwen3_5_moe: {exc}") from None


class Model(ExpertLayouts, qwen3_5.Model):
    text_defaults: ClassVar[Mapping[str, Any]] = TEXT_DEFAULTS

    @classmethod
    def moe_config(cls, text: Mapping[str, Any]) -> MoEConfig:
        return moe_config(text)
