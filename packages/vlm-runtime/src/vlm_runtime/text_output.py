"""Turn a request's generated tokens into text: reasoning apart from the answer, stop strings cut out.

One ``TextOutput`` per request; the single-stream loop and the batching engine both feed it token by token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .detokenizer import StreamingDetokenizer
from .stopping import StopStrings
from .thinking import ThinkingTokens

__all__ = ["TextDelta", "TextOutput"]


@dataclass(frozen=True)
class TextDelta:
    text: str = ""
    reasoning: str = ""
    stopped: bool = False
    """A stop string was reached: the request is done and nothing after it is emitted."""


class TextOutput:
    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        *,
        thinking: ThinkingTokens | None = None,
        inside_thinking: bool = False,
        stop: Sequence[str] = (),
    ) -> None:
        self._decode = decode
        self._thinking = thinking
        self.inside_thinking = inside_thinking and thinking is not None
        self._detokenizer = StreamingDetokenizer(decode)
        self._stop = StopStrings(list(stop)) if stop else None
        self._answer_started = False
        self._after_thinking = self.inside_thinking
        """Whether the answer follows a thinking block (then its leading blank lines are the template's)."""
        self.stopped = False

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop.matched if self._stop is not None else None

    def add(self, token: int) -> TextDelta:
        if self.stopped:
            return TextDelta(stopped=True)
        marks = self._thinking
        if marks is not None and token in (marks.start, marks.end):
            opening = token == marks.start
            if opening != self.inside_thinking:
                delta = self._switch()
                self.inside_thinking = opening
                self._after_thinking = self._after_thinking or opening
                return delta
            return TextDelta()
        piece = self._detokenizer.add_token(token)
        return self._route(piece)

    def finish(self) -> TextDelta:
        """Flush what was held back at the end of the stream."""
        if self.stopped:
            return TextDelta(stopped=True)
        delta = self._route(self._detokenizer.finalize())
        if self._stop is not None and not delta.stopped and not self.inside_thinking:
            return TextDelta(delta.text + self._stop.flush(), delta.reasoning)
        return delta

    def _switch(self) -> TextDelta:
        delta = self._route(self._detokenizer.finalize())
        self._detokenizer = StreamingDetokenizer(self._decode)
        return delta

    def _route(self, piece: str) -> TextDelta:
        if not piece:
            return TextDelta()
        if self.inside_thinking:
            return TextDelta(reasoning=piece)
        if not self._answer_started:
            # Templates put blank lines between the thinking block and the answer; the answer starts at its text.
            piece = piece.lstrip() if self._after_thinking else piece
            if not piece:
                return TextDelta()
            self._answer_started = True
        if self._stop is None:
            return TextDelta(text=piece)
        text, hit = self._stop.feed(piece)
        self.stopped = hit
        return TextDelta(text=text, stopped=hit)
