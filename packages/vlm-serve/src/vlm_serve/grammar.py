"""Structured outputs: a grammar (from a JSON schema, or a Lark grammar for tool calls) enforced while decoding.

llguidance compiles the grammar against the tokenizer and, at each step, says which tokens may come next; the
constraint masks the rest. It runs as a per-request logits processor on the engine thread.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from .errors import APIError

__all__ = ["GrammarConstraint", "GrammarFactory", "json_schema_grammar"]


# No free whitespace: a model (a small one especially) could otherwise spend its whole budget on blank lines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise APIError(400, f"invalid JSON schema: {e}", param="response_format") from e


class GrammarFactory:
    """One per loaded model: the llguidance view of its tokenizer (built once, on first use; ~1 s)."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                eos = sorted(self._processor.eos_token_ids)
                self._tokenizer = llguidance.hf.from_tokenizer(self._processor.tokenizer, eos_token=eos)
            return self._tokenizer

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint for one request; a grammar llguidance rejects is a 400."""
        tokenizer = self.tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise APIError(400, f"cannot use this schema or grammar: {matcher.get_error()}", param="response_format")
        return GrammarConstraint(matcher, tokenizer.vocab_size)


class GrammarConstraint:
    """A logits processor: feeds the tokens generated since its last call to the matcher, then masks every
    token the grammar does not allow next."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._seen: int | None = None

    def fork(self) -> GrammarConstraint:
        """An independent copy in this state (speculative decoding masks its drafter's proposals with it)."""
        twin = GrammarConstraint(self._matcher.deep_copy(), self._vocab)
        twin._seen = self._seen
        return twin

    def __call__(self, logits: mx.array, history: mx.array, generated: int) -> mx.array:
        length = history.shape[1]
        if self._seen is not None and length > self._seen:
            self._matcher.consume_tokens(history[0, self._seen :].tolist())
        self._seen = length
        if self._matcher.is_error():
            raise RuntimeError(f"structured output: {self._matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(logits.shape[-1], dtype=bool)
        n = min(self._vocab, logits.shape[-1])
        allowed[:n] = bits[:n].astype(bool)
        return mx.where(mx.array(allowed)[None], logits, mx.array(float("-inf"), logits.dtype))


def response_format_schema(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema an OpenAI ``response_format`` asks for (None for plain text)."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(
                400, "response_format.json_schema must be an object with a 'schema' object", param="response_format"
            )
        return spec.get("schema") or {"type": "object"}
    raise APIError(400, f"unsupported response_format type {kind!r}", param="response_format")


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
