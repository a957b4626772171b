"""Thinking blocks: where reasoning starts and ends, and a budget on its length.

Reasoning models write ``<think> ... </think>`` before the answer (Gemma 4: ``<|channel> ... <channel|>``; a
processor's ``thinking_markers`` say which). A budget caps the tokens inside the block: once spent, the runtime
writes ``\\n`` and the end token itself, and the model continues with its answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .field_types import check_field_types

__all__ = [
    "DEFAULT_MARKERS",
    "ThinkingConfig",
    "ThinkingTokens",
    "ThinkingBudget",
    "resolve_thinking_tokens",
    "prompt_opens_thinking",
]

DEFAULT_MARKERS = ("<think>", "</think>")
"""The thinking block's markers for models that do not name their own."""


@dataclass(frozen=True)
class ThinkingConfig:
    budget: int | None = None
    """Tokens allowed inside the thinking block; None for no limit."""
    start_token: str | None = None
    """None: the model's own marker (its processor's ``thinking_markers``)."""
    end_token: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "thinking_")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.budget}")
        if self.start_token == "" or self.end_token == "":
            raise ValueError("thinking start and end tokens must be non-empty")

    def markers(self, model_markers: tuple[str, str] = DEFAULT_MARKERS) -> tuple[str, str]:
        """(start, end): those given here, else the model's."""
        return (self.start_token or model_markers[0], self.end_token or model_markers[1])


@dataclass(frozen=True)
class ThinkingTokens:
    start: int
    end: int
    closing: tuple[int, ...]
    """What the runtime writes when the budget is spent: ``\\n`` then the end token."""


def resolve_thinking_tokens(
    config: ThinkingConfig, encode: Callable[[str], list[int]], model_markers: tuple[str, str] = DEFAULT_MARKERS
) -> ThinkingTokens | None:
    """The token ids of the markers (``config``'s, else ``model_markers``), or None where the tokenizer has no
    single token for them (no thinking)."""
    start_text, end_text = config.markers(model_markers)
    start, end = encode(start_text), encode(end_text)
    if len(start) != 1 or len(end) != 1:
        if config.budget is not None:
            raise ValueError(
                f"a thinking budget needs {start_text!r} and {end_text!r} to be single tokens of "
                "this tokenizer; this model has no thinking block"
            )
        return None
    closing = tuple(encode("\n")) + (end[0],)
    return ThinkingTokens(start=start[0], end=end[0], closing=closing)


def prompt_opens_thinking(prompt_tokens: Sequence[int], tokens: ThinkingTokens) -> bool:
    """True when the prompt leaves a thinking block open (templates with thinking enabled end with ``<think>``)."""
    for token in reversed(prompt_tokens):
        if token == tokens.end:
            return False
        if token == tokens.start:
            return True
    return False


class ThinkingBudget:
    """Follows the generated tokens; once the block has used its budget, says which tokens to write instead.

    ``observe(token)`` is called with each generated token in order and returns the token the runtime must
    emit next in place of the model's choice, or None. A budget of 0 closes the block right after it opens.
    """

    def __init__(self, tokens: ThinkingTokens, budget: int, *, inside: bool) -> None:
        self._tokens = tokens
        self._budget = budget
        self._inside = inside
        self._used = 0
        self._pending: list[int] = []
        if inside and budget == 0:
            self._pending = list(tokens.closing)

    @property
    def inside(self) -> bool:
        return self._inside

    def first_override(self) -> int | None:
        """The token to emit first, before any has been generated (a zero budget with the block already open)."""
        return self._pending.pop(0) if self._pending else None

    def __call__(self, token: int | None) -> int | None:
        """The generation loop's override hook: None before the first token."""
        return self.first_override() if token is None else self.observe(token)

    def observe(self, token: int) -> int | None:
        if token == self._tokens.end:
            self._inside = False
            self._pending.clear()
        elif token == self._tokens.start and not self._inside:
            self._inside, self._used = True, 0
            if self._budget == 0:
                self._pending = list(self._tokens.closing)
        elif self._inside and not self._pending:
            self._used += 1
            if self._used >= self._budget:
                self._pending = list(self._tokens.closing)
        return self._pending.pop(0) if self._pending else None
