"""Stop strings: cut the text at the first stop string, and never send any part of one.

Text that could be the start of a stop string is held back until the next delta shows whether it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StopResult:
    text: str  # safe to send now
    stopped: bool  # a stop string was found; generation must end


class StopStringFilter:
    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, delta: str) -> StopResult:
        if not self._stops:
            return StopResult(delta, False)
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return StopResult(text[:cut], True)
        hold = self._held_suffix(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return StopResult(text[: len(text) - hold], False)

    def flush(self) -> str:
        """The held-back text, once the generation ends for another reason."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
