"""EAGLE-3 drafters in the speculators checkpoint layout (``speculators_model_type: "eagle3"``).

An EAGLE-3 head is one decoder layer that reads the target's own hidden states: those entering three of its
layers (``eagle_aux_hidden_state_layer_ids``) are concatenated and projected to the head's width (``fc``). At
draft position j the layer sees, side by side, the embedding of token j+1 and the target's features at position
j (normed apart: ``input_layernorm``, ``hidden_norm``; queries, keys and values are projected from both), and
predicts token j+2 over a reduced draft vocabulary (``lm_head``), which ``d2t`` maps back to the target's
(target id = draft id + d2t[draft id]). Past the target's last position, the layer's own output stands in for
the features. The head keeps a KV cache of its one layer in step with the target's accepted tokens.

Weights: ``fc``, ``layers.0.*`` (or ``midlayer.*``, the EAGLE repository's name), ``norm``, ``lm_head``,
``d2t`` / ``t2d``, and ``embed_tokens`` where the checkpoint carries it (else the target's embeddings are read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vlm_runtime import KVCache
from vlm_runtime.speculative import DraftMask, masked_argmax

from .nn.layers import Attention, GatedMLP
from .nn.rope import Rotary

__all__ = ["Eagle3Config", "Eagle3Drafter", "Eagle3Head", "load_eagle3", "sanitize"]


class Eagle3Error(ValueError):
    """A checkpoint that is not a usable EAGLE-3 head; the message says why, in one line."""


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    """The target's vocabulary (embeddings, ``t2d``)."""
    draft_vocab_size: int
    target_hidden_size: int
    target_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    norm_before_residual: bool = False

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> Eagle3Config:
        layer = dict(config.get("transformer_layer_config") or {})
        if not layer:
            raise Eagle3Error("an eagle3 config needs its transformer_layer_config")
        if int(layer.get("num_hidden_layers", 1)) != 1:
            raise Eagle3Error(
                f"eagle3 heads of {layer['num_hidden_layers']} layers are not supported (the published heads have one)"
            )
        scaling = layer.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise Eagle3Error(
                f"eagle3 heads with {scaling.get('rope_type', scaling.get('type'))} rope scaling are not supported"
            )
        layers = config.get("eagle_aux_hidden_state_layer_ids")
        if not layers:
            raise Eagle3Error(
                "an eagle3 config must name the target layers it reads (eagle_aux_hidden_state_layer_ids)"
            )
        hidden = int(layer["hidden_size"])
        heads = int(layer["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(layer.get("num_key_value_heads", heads)),
            head_dim=int(layer.get("head_dim") or hidden // heads),
            intermediate_size=int(layer["intermediate_size"]),
            vocab_size=int(layer["vocab_size"]),
            draft_vocab_size=int(config.get("draft_vocab_size") or layer["vocab_size"]),
            target_hidden_size=int(config.get("target_hidden_size") or hidden),
            target_layers=tuple(int(i) for i in layers),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
            rope_theta=float(layer.get("rope_theta", 10000.0)),
            hidden_act=str(layer.get("hidden_act", "silu")),
            attention_bias=bool(layer.get("attention_bias", False)),
            norm_before_residual=bool(config.get("norm_before_residual", False)),
        )


class Eagle3Layer(nn.Module):
    """The decoder layer over (token embedding, features): attention reads both, the residual is the features."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Attention(
            hidden,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.attention_bias,
            in_dim=2 * hidden,
        )
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self._norm_before_residual = config.norm_before_residual

    def __call__(self, embeds: mx.array, features: mx.array, rotate: Any, mask: Any, cache: Any) -> mx.array:
        normed = self.hidden_norm(features)
        residual = normed if self._norm_before_residual else features
        both = mx.concatenate([self.input_layernorm(embeds), normed], axis=-1)
        h = residual + self.self_attn(both, rotate, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    def __init__(self, config: Eagle3Config, with_embeddings: bool) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.target_hidden_size * len(config.target_layers), config.hidden_size, bias=False)
        self.layers = [Eagle3Layer(config)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        if with_embeddings:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self._rotary = Rotary(config.head_dim, config.rope_theta)

    def step(self, embeds: mx.array, features: mx.array, cache: KVCache, start: int) -> mx.array:
        """The layer's output (before the final norm) over consecutive draft positions; the first is position
        ``start + cache.offset``."""
        rotate = self._rotary.at_offset(start + cache.offset)
        mask = cache.make_mask(embeds.shape[1], embeds.dtype)
        return self.layers[0](embeds, features, rotate, mask, cache)

    def draft_logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(self.norm(hidden))


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """The head's weights under this module's names (pure, idempotent): ``midlayer.`` is ``layers.0.``, and the
    vocabulary maps and a training-only verifier head are left out (``vocabulary_maps`` reads the maps)."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if key in ("d2t", "t2d") or key.startswith(("verifier_", "input_norm.")):
            continue
        if key.startswith("midlayer."):
            key = "layers.0." + key.removeprefix("midlayer.")
        out[key] = value
    return out


def vocabulary_maps(weights: Mapping[str, mx.array], config: Eagle3Config) -> mx.array | None:
    """Draft id -> target id (None where the draft vocabulary is the target's)."""
    d2t = weights.get("d2t")
    if d2t is None:
        if config.draft_vocab_size != config.vocab_size:
            raise Eagle3Error("a reduced draft vocabulary needs its d2t map")
        return None
    if d2t.shape != (config.draft_vocab_size,):
        raise Eagle3Error(f"d2t has shape {tuple(d2t.shape)}, expected ({config.draft_vocab_size},)")
    target = mx.arange(config.draft_vocab_size) + d2t.astype(mx.int32)
    if int(target.min().item()) < 0 or int(target.max().item()) >= config.vocab_size:
        raise Eagle3Error(f"d2t maps draft tokens outside the target's {config.vocab_size} tokens")
    return target.astype(mx.int32)


class Eagle3Drafter:
    """The ``eagle3`` kind behind the runtime's ``Drafter`` protocol: one request's head state.

    Draft position j pairs token j+1 with the target's features at position j. ``propose`` first drops the
    positions it drafted last time, feeds the target's features it was handed (the positions the target kept,
    all paired with tokens now known), then drafts greedily from the layer's own output.
    """

    def __init__(self, head: Eagle3Head, to_target: mx.array | None, embed: Callable[[mx.array], mx.array]) -> None:
        self.head, self._to_target, self._embed = head, to_target, embed
        self.target_layers = head.config.target_layers
        self.feature_width = int(head.fc.weight.shape[1])
        """Channels of the target's features it reads: hidden size x layers."""
        self._cache = KVCache()
        self._prompt: list[int] = []
        self._start = 0
        """The first target position the head has features of (a prefix cache may have held earlier ones)."""
        self._committed = 0
        """Draft positions fed with the target's features (the cache holds these, then the last drafts)."""
        self._pending: list[mx.array] = []

    def spawn(self) -> Eagle3Drafter:
        return Eagle3Drafter(self.head, self._to_target, self._embed)

    def begin(self, inputs: Mapping[str, mx.array], features: mx.array | None = None) -> None:
        self._prompt = [int(t) for t in inputs["input_ids"][0].tolist()]
        self._cache = KVCache()
        self._committed = 0
        self._pending = [] if features is None else [self._checked(features)]
        self._start = len(self._prompt) - (0 if features is None else features.shape[1])

    def propose(
        self, emitted: Sequence[int], n: int, features: mx.array | None = None, mask: DraftMask | None = None
    ) -> list[int]:
        if features is not None:
            self._pending.append(self._checked(features))
        sequence = self._prompt + list(emitted)
        self._cache.trim(self._cache.offset - self._committed)  # the last round's drafts
        hidden = None
        if self._pending:
            fresh = mx.concatenate(self._pending, axis=1)
            self._pending = []
            first = self._start + self._committed
            tokens = sequence[first + 1 : first + 1 + fresh.shape[1]]
            fresh = fresh[:, : len(tokens)]  # every fed position is paired with the token after it
            if tokens:
                ids = mx.array([tokens], mx.int32)
                hidden = self.head.step(self._embed(ids), self.head.fc(fresh), self._cache, self._start)[:, -1:]
                self._committed += len(tokens)
        if hidden is None or n <= 0:
            return []
        proposals: list[int] = []
        for i in range(n):
            token = self._choose(self.head.draft_logits(hidden[:, -1]), mask, proposals)
            if token is None:
                break
            proposals.append(token)
            if i + 1 < n:
                hidden = self.head.step(self._embed(mx.array([[token]], mx.int32)), hidden, self._cache, self._start)
        return proposals

    def _choose(self, logits: mx.array, mask: DraftMask | None, proposals: list[int]) -> int | None:
        """The greedy proposal as a target token id; a mask sees the draft vocabulary spread over the target's."""
        if self._to_target is None:
            return masked_argmax(logits, mask, proposals)
        if mask is None:
            return int(self._to_target[int(mx.argmax(logits, axis=-1).item())].item())
        spread = mx.full((1, self.head.config.vocab_size), -mx.inf, logits.dtype)
        spread[:, self._to_target] = logits
        return masked_argmax(spread, mask, proposals)

    def _checked(self, features: mx.array) -> mx.array:
        width = self.head.fc.weight.shape[1]
        if features.shape[-1] != width:
            raise ValueError(
                f"the eagle3 head reads {width} feature channels; the target hands it {features.shape[-1]} "
                "(a head trained for another target)"
            )
        return features


def load_eagle3(path: Path, embed: Callable[[mx.array], mx.array] | None = None) -> Eagle3Drafter:
    """The head at ``path`` (config.json and *.safetensors in the speculators layout). ``embed``: the target's
    token embeddings, for heads that do not carry their own."""
    config = Eagle3Config.from_hf(json.loads((path / "config.json").read_text()))
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise Eagle3Error(f"{path} has no *.safetensors weight files")
    to_target = vocabulary_maps(weights, config)
    own = sanitize(weights)
    with_embeddings = "embed_tokens.weight" in own
    if not with_embeddings and embed is None:
        raise Eagle3Error("this eagle3 head has no embeddings of its own: load it with its target model")
    head = Eagle3Head(config, with_embeddings)
    try:
        head.load_weights(list(own.items()), strict=True)
    except ValueError as exc:
        raise Eagle3Error(f"the eagle3 weights do not fit their config: {exc}") from None
    mx.eval(head.parameters())
    return Eagle3Drafter(head, to_target, head.embed_tokens if with_embeddings else embed)  # type: ignore[arg-type]
