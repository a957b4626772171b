"""Streaming detokenization that never splits a UTF-8 character.

Decoding token by token can cut a multi-byte character in half (the tokenizer then yields U+FFFD). We decode
the tokens of the current line as a whole and hold text back while it ends in a partial character; starting a
new segment after each newline keeps the re-decoding cost bounded by the line length.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["StreamingDetokenizer"]

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self._segment: list[int] = []
        self._segment_emitted = 0
        self._text_parts: list[str] = []

    def add_token(self, token: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.tokens.append(token)
        self._segment.append(token)
        text = self._decode(self._segment)
        if text.endswith(REPLACEMENT):
            return ""
        new = text[self._segment_emitted :]
        self._segment_emitted = len(text)
        if text.endswith("\n"):
            self._segment = []
            self._segment_emitted = 0
        self._text_parts.append(new)
        return new

    def finalize(self) -> str:
        """Flush what is held back (a truly invalid byte sequence comes out as U+FFFD)."""
        if not self._segment:
            return ""
        text = self._decode(self._segment)
        new = text[self._segment_emitted :]
        self._segment, self._segment_emitted = [], 0
        self._text_parts.append(new)
        return new

    @property
    def text(self) -> str:
        return "".join(self._text_parts)
