"""DFlash drafters in the z-lab layout (``architectures: ["DFlashDraftModel"]``): a block of tokens per round.

A DFlash drafter is a few Qwen3-style decoder layers that draft a whole block in one forward pass: the block is
the last emitted token followed by mask tokens (``mask_token_id``), embedded with the target's embeddings, and
its layers attend over the target's context, the hidden states the target produced at every position it kept
(those leaving the layers ``target_layer_ids`` names, concatenated, projected by ``fc`` and normed by
``hidden_norm``), plus the block itself (both ways unless the config says ``is_causal``). Keys and values of the
context stay in the drafter's caches round after round; the block's never do, so nothing needs taking back. The
block's outputs, normed, go through the target's own output head; positions 1.. are the proposals.

Weights: ``fc``, ``hidden_norm``, ``layers.N.*`` (attention with per-head q/k norms, gated MLP), ``norm``; no
embeddings and no head of its own. DFlash2 (its convolutions and candidate selector) and sliding-window layers
are refused with one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime import KVCache
from vlm_runtime.attention import attention
from vlm_runtime.speculative import DraftMask, masked_argmax

from .nn.layers import Attention, GatedMLP
from .nn.rope import Rotary

__all__ = ["DFlashConfig", "DFlashDrafter", "DFlashModel", "load_dflash", "sanitize"]


class DFlashError(ValueError):
    """A checkpoint that is not a usable DFlash drafter; the message says why, in one line."""


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    causal: bool = False
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None

    @property
    def target_layers(self) -> tuple[int, ...]:
        """The same layers in ``ExposesLayers`` numbering: DFlash names a layer by its output, the hidden states
        entering the next one (the last layer's, which transformers hands out after the final norm, is read
        before it here; published drafters read earlier layers)."""
        return tuple(i + 1 for i in self.target_layer_ids)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> DFlashConfig:
        if any("dflash2" in str(a).lower() for a in config.get("architectures") or ()):
            raise DFlashError("DFlash2 drafters (convolutions and a candidate selector) are not supported")
        extra = dict(config.get("dflash_config") or {})

        def value(name: str, default: Any = None) -> Any:
            return extra.get(name, config.get(name, default))

        layers = value("target_layer_ids")
        if not layers:
            raise DFlashError("a DFlash config must name the target layers it reads (dflash_config.target_layer_ids)")
        if value("mask_token_id") is None:
            raise DFlashError("a DFlash config must give its mask_token_id")
        if "sliding_attention" in (config.get("layer_types") or ()):
            raise DFlashError("DFlash drafters with sliding-window layers are not supported")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type")) not in (None, "default"):
            raise DFlashError(f"DFlash drafters with {rope.get('rope_type', rope.get('type'))} rope are not supported")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        softcap = value("final_logit_softcapping")
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            target_layer_ids=tuple(int(i) for i in layers),
            mask_token_id=int(value("mask_token_id")),
            block_size=int(value("block_size", 16)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 1_000_000.0))),
            hidden_act=str(config.get("hidden_act", "silu")),
            attention_bias=bool(config.get("attention_bias", False)),
            causal=bool(config.get("is_causal", False)),
            output_multiplier=float(value("output_multiplier", 1.0)),
            final_logit_softcapping=float(softcap) if softcap else None,
        )


class DFlashLayer(nn.Module):
    """Pre-norm block whose attention reads the target's context (keys and values only) and the block."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.attention_bias,
            out_bias=config.attention_bias,
            qk_norm=lambda dim: nn.RMSNorm(dim, eps=config.rms_norm_eps),
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._causal = config.causal

    def __call__(self, block: mx.array, context: mx.array, rotary: Rotary, context_at: int, cache: KVCache) -> mx.array:
        """``context``: the new context positions (from ``context_at``), their keys and values kept in
        ``cache``; ``block`` follows them."""
        attn = self.self_attn
        normed = self.input_layernorm(block)
        q, k_block, v_block = attn.project(normed)
        if context.shape[1]:
            _, k_context, v_context = attn.project(context)
            keys, values = cache.update_and_fetch(rotary.at_offset(context_at)(k_context), v_context)
        else:
            keys, values = cache.state if cache.keys is not None else (None, None)
        block_at = context_at + context.shape[1]
        rotate = rotary.at_offset(block_at)
        q, k_block = rotate(q), rotate(k_block)
        if keys is not None:
            k_block, v_block = mx.concatenate([keys, k_block], axis=2), mx.concatenate([values, v_block], axis=2)
        mask = None
        if self._causal:
            length, total = block.shape[1], k_block.shape[2]
            mask = mx.arange(total)[None] <= (total - length + mx.arange(length))[:, None]
        out = attention(q, k_block, v_block, scale=attn.scale, mask=mask)  # a block of queries: no per-shape plan
        h = block + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(block.shape[0], block.shape[1], -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashModel(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.hidden_size * len(config.target_layer_ids), config.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = [DFlashLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rotary = Rotary(config.head_dim, config.rope_theta)

    def __call__(self, block: mx.array, features: mx.array, context_at: int, cache: list[KVCache]) -> mx.array:
        """The block's normed outputs, given the target's new context ``features`` (from position
        ``context_at``); the context's keys and values are added to ``cache``."""
        context = self.hidden_norm(self.fc(features))
        h = block
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, context, self._rotary, context_at, layer_cache)
        return self.norm(h)


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """This module's names (pure, idempotent): an optional ``model.`` prefix dropped."""
    return {k.removeprefix("model."): v for k, v in weights.items()}


class DFlashDrafter:
    """The ``dflash`` kind behind the runtime's ``Drafter`` protocol: one request's context caches.

    ``propose`` adds the target's features it was handed to the context, then drafts ``n`` tokens in one pass
    over the block [last emitted token, mask x n].
    """

    def __init__(self, model: DFlashModel, target: Any) -> None:
        self.model, self.target = model, target
        self.target_layers = model.config.target_layers
        self.feature_width = int(model.fc.weight.shape[1])
        """Channels of the target's features it reads: hidden size x layers."""
        self._cache: list[KVCache] = []
        self._prompt: list[int] = []
        self._next = 0
        """The position of the next context feature."""
        self._pending: list[mx.array] = []

    def spawn(self) -> DFlashDrafter:
        return DFlashDrafter(self.model, self.target)

    def begin(self, inputs: Mapping[str, mx.array], features: mx.array | None = None) -> None:
        self._prompt = [int(t) for t in inputs["input_ids"][0].tolist()]
        self._cache = [KVCache() for _ in self.model.layers]
        self._pending = [] if features is None else [self._checked(features)]
        self._next = len(self._prompt) - (0 if features is None else features.shape[1])

    def propose(
        self, emitted: Sequence[int], n: int, features: mx.array | None = None, mask: DraftMask | None = None
    ) -> list[int]:
        if features is not None:
            self._pending.append(self._checked(features))
        if n <= 0:
            return []
        sequence = self._prompt + list(emitted)
        context = mx.concatenate(self._pending, axis=1) if self._pending else mx.zeros((1, 0, self._width()))
        self._pending = []
        at = self._next
        self._next += context.shape[1]
        ids = mx.array([[sequence[-1]] + [self.model.config.mask_token_id] * n], mx.int32)
        out = self.model(self.target.embed_tokens(ids), context, at, self._cache)
        logits = self.target.compute_logits(out[:, 1:]) * self.model.config.output_multiplier
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = mx.tanh(logits / cap) * cap
        if mask is None:
            return [int(t) for t in mx.argmax(logits, axis=-1)[0].tolist()]
        proposals: list[int] = []  # the block's positions were drafted together; the grammar reads them in order
        for i in range(n):
            token = masked_argmax(logits[:, i], mask, proposals)
            if token is None:
                break
            proposals.append(token)
        return proposals

    def _width(self) -> int:
        return self.model.fc.weight.shape[1]

    def _checked(self, features: mx.array) -> mx.array:
        if features.shape[-1] != self._width():
            raise ValueError(
                f"the DFlash drafter reads {self._width()} feature channels; the target hands it {features.shape[-1]} "
                "(a drafter trained for another target)"
            )
        return features


def load_dflash(path: Path, target: Any) -> DFlashDrafter:
    """The drafter at ``path`` (config.json and *.safetensors in the z-lab layout), drafting for ``target``,
    whose embeddings and output head it uses."""
    if target is None:
        raise DFlashError("a DFlash drafter has no embeddings or head of its own: load it with its target model")
    config = DFlashConfig.from_hf(json.loads((path / "config.json").read_text()))
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise DFlashError(f"{path} has no *.safetensors weight files")
    vocabulary = int(target.compute_logits(mx.zeros((1, config.hidden_size))).shape[-1])
    if not 0 <= config.mask_token_id < vocabulary:
        raise DFlashError(f"mask_token_id {config.mask_token_id} is not a token of the target ({vocabulary} tokens)")
    model = DFlashModel(config)
    try:
        model.load_weights(list(sanitize(weights).items()), strict=True)
    except ValueError as exc:
        raise DFlashError(f"the DFlash weights do not fit their config: {exc}") from None
    mx.eval(model.parameters())
    return DFlashDrafter(model, target)
