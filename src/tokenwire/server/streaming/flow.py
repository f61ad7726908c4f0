"""Flow control, one rule for every door: a generation whose reader falls too far behind is paused in the engine
(it leaves the running batch and costs no compute) and goes on once the reader has caught up.

"Too far" is a high water mark, "caught up" a low one, on one of two measures:

- tokens generated but not yet written to the reader (the WebSocket door's journal counts them):
  ``--max-unsent-tokens``, going on at half of it (:meth:`WaterMarks.halving`);
- bytes written but not yet read from the socket (backlog.py): :data:`SOCKET_UNREAD`, 16 KiB, going on at 8 KiB
  (the Realtime and SSE doors pause on it; the WebSocket door stops writing at it).

A :class:`Valve` keeps one reader's state between the marks. Pure: the doors measure, ask the valve, and pause or
unpause in the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WaterMarks:
    """Pause at or past ``high``; go on at or below ``low``. ``high`` 0: never paused for the level."""

    high: int
    low: int

    @classmethod
    def halving(cls, high: int) -> WaterMarks:
        """Pause at ``high``, go on at half of it."""
        return cls(high, high // 2)

    @property
    def enabled(self) -> bool:
        return self.high > 0


SOCKET_UNREAD = WaterMarks.halving(16 << 10)  # bytes a reader has not taken from its socket


class Change(enum.Enum):
    """What a reading of the level asks of the generation."""

    PAUSE = "pause"
    GO_ON = "go_on"


class Valve:
    """One reader's state between the marks: :meth:`update` says when to pause and when to go on, once each."""

    def __init__(self, marks: WaterMarks) -> None:
        self.marks = marks
        self.paused = False

    def update(self, level: int, force: bool = False, hold: bool = False) -> Change | None:
        """The change ``level`` asks for, if any. ``force``: pause whatever the level (the reader is gone, a write is
        stalled); ``hold``: do not go on whatever the level (the same conditions, still true)."""
        if not self.paused:
            if force or (self.marks.enabled and level >= self.marks.high):
                self.paused = True
                return Change.PAUSE
        elif not hold and (not self.marks.enabled or level <= self.marks.low):
            self.paused = False
            return Change.GO_ON
        return None


@dataclass(slots=True, frozen=True)
class FlowPolicy:
    """How far a WebSocket generation may run ahead of its reader (ws/generation.py says how it is applied)."""

    max_unsent_tokens: int = 64  # paused past this; continues at half of it (0: never paused for a slow reader)
    coalesce_after: int = 4  # with this many messages unwritten, new text waits and goes out as one message
    max_socket_bytes: int = SOCKET_UNREAD.high  # a connection writes while its socket holds fewer unread bytes
    pause_orphans: bool = True  # a generation whose connection dropped is paused until it is resumed

    @property
    def unsent_tokens(self) -> WaterMarks:
        """The marks on tokens generated but not yet written to the reader."""
        return WaterMarks.halving(self.max_unsent_tokens)
