"""The numbered messages of one stream, wherever they are kept: append, read from a number, wait for more, finish.

A WebSocket generation's journal (journal.py) and a Responses stream's event log (responses/store.py) are both a
:class:`MessageLog`: entry ``i`` is message ``i``, so a reader that saw message ``n`` reads on from ``n + 1``, at
once or after a reconnection. No connections and no tasks here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Entry:
    """One message of a generation: its JSON text, and the tokens it carries (for the counters)."""

    data: str
    tokens: int = 0
    final: bool = False  # complete or error: the generation's last message
    ids: tuple[int, ...] = ()  # the ids of the tokens it carries (a shared journal keeps them for failover)


class MessageLog:
    """The messages of one generation, in ``seq`` order (entry ``i`` has ``seq == i``): what they go through wherever
    they are kept. Append, read from a seq, wait for more, finish; expiry belongs to whoever keeps logs (here
    :meth:`Registry.sweep`; in Redis, the keys' time to live). No connections, no tasks: those are
    :class:`Journal`'s."""

    __slots__ = ("_grew", "dropped", "entries", "finished", "gen_id", "nbytes", "tokens")

    def __init__(self, gen_id: str) -> None:
        self.gen_id = gen_id
        self.entries: list[Entry] = []
        self.finished = False  # no more entries will come
        self.nbytes = 0
        self.tokens = 0  # tokens in all entries
        self.dropped = False  # its entries were let go (let_go)
        self._grew = asyncio.Event()

    @property
    def last_seq(self) -> int:
        """The seq of the newest message (-1 before the first)."""
        return len(self.entries) - 1

    def append(self, entry: Entry) -> int:
        """Add the next message; returns its seq."""
        if self.finished:
            raise RuntimeError(f"generation {self.gen_id!r} already ended")
        self.entries.append(entry)
        self.nbytes += len(entry.data)
        self.tokens += entry.tokens
        if entry.final:
            self.finished = True
        self._wake()
        return len(self.entries) - 1

    def read(self, first_seq: int) -> list[Entry]:
        """The messages from ``first_seq`` on, as far as they go now."""
        return self.entries[max(0, first_seq) :]

    def let_go(self) -> None:
        """Free the entries of a finished log (its keeper needs only the result); reading it gives nothing more."""
        self.entries = []
        self.nbytes = 0
        self.dropped = True

    def close(self) -> None:
        """No more entries (the producer stopped without a final message: aborted or shut down)."""
        if not self.finished:
            self.finished = True
            self._wake()

    async def wait_beyond(self, seq: int) -> None:
        """Return once a message after ``seq`` exists or the log is finished."""
        while self.last_seq <= seq and not self.finished:
            await self._grew.wait()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()
