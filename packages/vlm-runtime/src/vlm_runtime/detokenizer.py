"""Streaming detokenization that never splits a UTF-8 character.

Decoding token by token can cut a multi-byte character in half (the tokenizer then yields U+FFFD), and some
tokenizers decode a token differently at the start of a sequence (SentencePiece drops the leading space). So we
decode a short window that starts a few tokens back and emit only what extends the window's already-emitted text,
holding text back while it ends in a partial character. The cost per token is bounded by the window, not by the
length of the text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["StreamingDetokenizer"]

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        # tokens[_context:_emitted] were emitted already and give the window its left context.
        self._context = 0
        self._emitted = 0
        self._text_parts: list[str] = []

    def add_token(self, token: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.tokens.append(token)
        return self._flush(final=False)

    def finalize(self) -> str:
        """Flush what is held back (a truly invalid byte sequence comes out as U+FFFD)."""
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        if self._emitted == len(self.tokens):
            return ""
        known = self._decode(self.tokens[self._context : self._emitted])
        text = self._decode(self.tokens[self._context :])
        if not final and text.endswith(REPLACEMENT):
            return ""
        new = text[len(known) :]
        self._context, self._emitted = self._emitted, len(self.tokens)
        self._text_parts.append(new)
        return new

    @property
    def text(self) -> str:
        return "".join(self._text_parts)
