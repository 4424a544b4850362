"""Stop strings matched across streamed text deltas, sans-IO.

A stop string can arrive split over several deltas, so text that might still become the start
of a stop string is held back until it is known not to be one; nothing that belongs to (or
follows) a stop string is ever emitted, unless the stop string itself is asked for.

The match is independent of how the text is split: generation stops at the first position where
any stop string ends; if several end there, the longest (earliest starting) one is taken.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feeds text deltas and tells what is safe to emit and whether a stop string was hit.

    ``stop_strings`` are the non-empty strings that end generation (empty strings are
    ignored); ``include_stop_str`` emits the matched stop string itself too.
    """

    def __init__(self, stop_strings: Iterable[str], include_stop_str: bool = False) -> None:
        self._stops = tuple(sorted({s for s in stop_strings if s}, key=len, reverse=True))
        self._include = include_stop_str
        self._held = ""
        self._stopped = False
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """True once a stop string has been matched."""
        return self._stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended generation, or None."""
        return self._matched

    @property
    def held(self) -> str:
        """The text held back because it might still begin a stop string."""
        return self._held

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return (text safe to emit now, whether a stop string was matched).

        After a match every further call returns ("", True).
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._held + delta
        best_end = -1
        best: str | None = None
        for stop in self._stops:  # longest first, so a tie on the end keeps the longest
            start = buf.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best_end):
                best_end = start + len(stop)
                best = stop
        if best is not None:
            self._stopped = True
            self._matched = best
            self._held = ""
            cut = best_end if self._include else best_end - len(best)
            return buf[:cut], True
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Return the held-back text when generation ends for another reason ("" if stopped)."""
        text, self._held = self._held, ""
        return "" if self._stopped else text

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
