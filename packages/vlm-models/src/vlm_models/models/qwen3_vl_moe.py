"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B): Qwen3-VL whose decoder MLPs are sparse mixtures of
experts (nn/moe.py), except in the layers ``mlp_only_layers`` names.

Only the experts differ from Qwen3-VL: their config, and their checkpoint layouts (fused ``gate_up_proj`` in
either orientation, one MLP per expert, MLX-community ``switch_mlp``), which ``sanitize`` maps onto ours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..config import ConfigError, from_dict, text_section
from ..nn.decoder import DecoderConfig
from ..nn.moe import ExpertLayouts, MoEConfig
from . import qwen3_vl


def moe_config(text: Mapping[str, Any]) -> MoEConfig:
    values = dict(text)
    if "num_local_experts" in values:  # transformers 5's name for it
        values.setdefault("num_experts", values["num_local_experts"])
    missing = [k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if k not in values]
    if missing:
        raise ConfigError(f"qwen3_vl_moe: the text config has no {', '.join(missing)}")
    try:
        # transformers renormalises the chosen experts' probabilities in this family whatever norm_topk_prob says.
        return from_dict(MoEConfig, values, norm_topk_prob=True)
    except ValueError as exc:
        raise ConfigError(f"qwen3_vl_moe: {exc}") from None


class Model(ExpertLayouts, qwen3_vl.Model):
    @classmethod
    def text_config(cls, config: Mapping[str, Any]) -> DecoderConfig:
        return dataclasses.replace(super().text_config(config), moe=moe_config(text_section(config)))
