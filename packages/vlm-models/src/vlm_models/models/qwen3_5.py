"""Qwen3.5: Qwen3-VL's vision tower (without deepstack) and prompt layout in front of a hybrid decoder that
interleaves gated delta-net linear attention with gated full attention (nn/hybrid.py), M-RoPE on a quarter of
each attention head.

Only what is particular to the family lives here: its config defaults and its checkpoint layouts. The published
checkpoints (transformers 5 names) also carry multi-token-prediction weights (``mtp.*``), which generation does
not use: ``sanitize`` drops them. MLX-community conversions (mlx-vlm's names) store the zero-centred norms as
1 + w and the convolution in MLX's layout; ``sanitize`` and ``mlx_community_names`` map between the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..config import text_section
from ..nn.decoder import TextGeneration
from ..nn.hybrid import HybridDecoder, HybridDecoderConfig
from ..nn.moe import MoEConfig
from ..nn.rope import MultimodalRotary
from . import qwen2_vl, qwen3_vl

TEXT_DEFAULTS: dict[str, Any] = {
    # transformers 5.25's Qwen3_5TextConfig defaults (published configs spell most of them out).
    "vocab_size": 248320,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "partial_rotary_factor": 0.25,
}
ROPE_DEFAULTS: dict[str, Any] = {"rope_theta": 10000.0, "mrope_section": [11, 11, 10]}
TOKEN_DEFAULTS = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053}

# The decoder's zero-centred RMSNorms (x / rms(x) * (1 + w)), under our names; the linear-attention output norm
# and the vision tower's LayerNorms are ordinary ones.
_CENTRED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight")
_FINAL_NORM = "model.language_model.norm.weight"
_OURS = "model.language_model."


@dataclass(frozen=True)
class VisionConfig(qwen3_vl.VisionConfig):
    deepstack_visual_indexes: tuple[int, ...] = ()


def normalized_text(config: Mapping[str, Any], defaults: Mapping[str, Any] = TEXT_DEFAULTS) -> dict[str, Any]:
    """The text config with transformers' defaults filled in, rope settings gathered in ``rope_parameters``."""
    text = {**defaults, **text_section(config)}
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):  # older configs keep them beside the other settings
        if key in text:
            rope.setdefault(key, text[key])
    text["rope_parameters"] = {**ROPE_DEFAULTS, **rope}
    return text


def is_centred_norm(name: str) -> bool:
    """Whether ``name`` (ours) is one of the decoder's zero-centred norms."""
    return name == _FINAL_NORM or (name.startswith(_OURS) and name.endswith(_CENTRED_NORMS))


def converted_by_mlx(weights: Mapping[str, mx.array]) -> bool:
    """Whether a checkpoint was written by an MLX converter: its convolutions are (channels, kernel, 1), and its
    zero-centred norms then hold 1 + w. Our own names (transformers 5's) always mean transformers' convention."""
    return any(
        k.endswith("linear_attn.conv1d.weight") and v.ndim == 3 and v.shape[-1] == 1 and not k.startswith(_OURS)
        for k, v in weights.items()
    )


def hybrid_sanitize(weights: Mapping[str, mx.array], rename: Any) -> dict[str, mx.array]:
    """``weights`` under our names (``rename`` maps one key), without the MTP head, the convolutions in MLX's
    layout and the norms in transformers' convention. Pure and idempotent."""
    shifted = converted_by_mlx(weights)
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key.startswith("mtp.") or ".mtp." in key:
            continue  # multi-token prediction head: for speculative decoding, not loaded
        name = rename(key)
        if name.endswith("linear_attn.conv1d.weight") and value.ndim == 3 and value.shape[-1] != 1:
            value = value.swapaxes(1, 2)  # transformers' Conv1d (channels, 1, kernel)
        if shifted and name != key and is_centred_norm(name):
            value = value - 1
        out[name] = value
    return out


def with_mlx_norms(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Our weights with the zero-centred norms as MLX converters store them (1 + w); names unchanged."""
    return {k: v + 1 if is_centred_norm(k) else v for k, v in weights.items()}


class Model(qwen3_vl.Model):
    vision_config_class = VisionConfig
    text_defaults: ClassVar[Mapping[str, Any]] = TEXT_DEFAULTS

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Model:
        text = normalized_text(config, cls.text_defaults)
        full = {**TOKEN_DEFAULTS, **config, "text_config": text}
        decoder = HybridDecoderConfig.from_hf(text, cls.moe_config(text))
        base = qwen2_vl.ModelConfig.from_hf(full, cls.vision_config_class, decoder=decoder)
        # M-RoPE is always interleaved, as in transformers, whatever "mrope_interleaved" says.
        return cls(dataclasses.replace(base, mrope_interleaved=True))

    @classmethod
    def moe_config(cls, text: Mapping[str, Any]) -> MoEConfig | None:
        return None

    @staticmethod
    def language_model_for(config: qwen2_vl.ModelConfig) -> nn.Module:
        rotary = MultimodalRotary(config.text.rotary_dim, config.rope_theta, config.mrope_section, interleaved=True)
        return HybridDecoder(config.text, rotary)

    def make_cache(self) -> list[Any]:
        return self.model.language_model.make_cache()

    _decode = TextGeneration._decode  # no deepstack channels to split off

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        return super().sanitize(hybrid_sanitize(weights, qwen2_vl._canonical_name))

    def mlx_community_names(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        return super().mlx_community_names(with_mlx_norms(weights))
