"""Stop strings over streamed text.

Text arrives in arbitrary pieces (one detokenized token at a time), so a stop string can span several pieces.
``StopStrings`` emits text as soon as it can no longer be the start of a stop string, and holds back only the
longest tail that still could be.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MAX_STOP_LENGTH", "MAX_STOP_STRINGS", "StopStrings"]

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512  # characters


class StopStrings:
    """Streaming matcher for a set of stop strings.

    ``feed(text)`` returns ``(safe_text, hit)``. Generation is meant to stop at the first stop string that
    *completes*; on a hit the concatenation of everything emitted is the stream up to the start of that
    occurrence (when several complete at the same character, the longest, i.e. earliest-starting, one wins),
    so no stop string is ever emitted. Feeds after a hit are no-ops returning ``("", True)``. At the end of a
    stream without a hit, ``flush()`` returns the held back tail.

    Work per feed is bounded by the piece's length plus the longest stop string, never the whole history:
    every partial match is contained in the held back tail (it is the longest suffix that is a prefix of
    some stop string), so only ``tail + piece`` needs searching.
    """

    __slots__ = ("_held", "_matched", "_stops")

    def __init__(self, stops: str | Iterable[str]) -> None:
        # A bare string is one stop string, not a set of characters.
        stops = [stops] if isinstance(stops, str) else list(stops)
        unique: list[str] = []
        for stop in stops:
            if not isinstance(stop, str):
                raise ValueError(f"stop strings must be str, got {type(stop).__name__}")
            if not stop:
                raise ValueError("stop strings must be non-empty")
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters, got {len(stop)}")
            if stop not in unique:
                unique.append(stop)
        if len(unique) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(unique)}")
        self._stops: tuple[str, ...] = tuple(unique)
        self._held = ""
        self._matched: str | None = None

    @classmethod
    def of(cls, stops: str | Iterable[str] | None) -> StopStrings | None:
        """From the usual API shapes (one string, a list, or None); None when there is nothing to match."""
        if stops is None:
            return None
        stops = [stops] if isinstance(stops, str) else list(stops)
        return cls(stops) if stops else None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def matched(self) -> str | None:
        """The stop string that was hit, or None."""
        return self._matched

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def held_back(self) -> str:
        """Text received but not yet emitted (shorter than the longest stop string)."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        if self._matched is not None:
            return "", True
        if not text:
            return "", False
        window = self._held + text

        # First completion wins: the occurrence with the smallest end; at equal ends, the longest stop.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = window.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_len, stop = best
            self._matched, self._held = stop, ""
            return window[: end + neg_len], True

        hold = self._longest_partial(window)
        self._held = window[len(window) - hold :] if hold else ""
        return window[: len(window) - hold], False

    def flush(self) -> str:
        """End of stream: release the held back tail (it never completed a stop string)."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, window: str) -> int:
        """Length of the longest suffix of ``window`` that is a proper prefix of some stop string."""
        best = 0
        n = len(window)
        for stop in self._stops:
            # Only suffixes longer than the best so far and shorter than the stop can improve on it.
            lo = max(0, n - len(stop) + 1)
            hi = n - best  # candidate starts must be < hi
            first = stop[0]
            i = window.find(first, lo, hi)
            while i >= 0:
                if stop.startswith(window[i:]):
                    best = n - i
                    break
                i = window.find(first, i + 1, hi)
        return best
