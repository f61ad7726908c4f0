"""The KV of paused requests, kept out of the batch while the KV-cache pool allows.

A paused request leaves the batch (engine/loop.py), but its block table stays in the block manager under its
request id, references held: a pause copies nothing. What is recorded here is which tokens those blocks hold, so
that when it continues (its prompt is then its old prompt plus what it generated) the table is adopted as it is and
only the rest is computed. Whenever sequences being admitted need the room, the oldest entries give way first: their
tables are freed through ``release``; their full blocks stay in the prefix cache, so such a request usually finds most
of its KV there again, and computes the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ParkedKV:
    token_ids: list[int]  # the tokens at positions 0..n-1 whose keys and values the request's blocks hold

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def fits(self, prompt_ids: list[int]) -> bool:
        """Whether these are the first positions of ``prompt_ids``, with at least one token left to compute (the
        last one's logits are what the next token is sampled from)."""
        n = len(self.token_ids)
        return 0 < n < len(prompt_ids) and prompt_ids[:n] == self.token_ids


class ParkedStore:
    """Kept KV by request id, oldest first."""

    def __init__(self, release: Callable[[str], None] = lambda request_id: None) -> None:
        """``release(request_id)`` frees the blocks of an entry that is dropped (not of one that is taken back)."""
        self._release = release
        self._entries: OrderedDict[str, ParkedKV] = OrderedDict()
        self.tokens = 0  # KV positions held, all entries together
        self.evicted = 0  # entries dropped for room, since the start

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def put(self, request_id: str, entry: ParkedKV) -> None:
        """Keep ``entry``; one already kept for the request is replaced (it described the same blocks)."""
        old = self._entries.pop(request_id, None)
        if old is not None:
            self.tokens -= old.tokens
        self._entries[request_id] = entry
        self.tokens += entry.tokens

    def take(self, request_id: str) -> ParkedKV | None:
        """Take an entry back to use its blocks (they are not released)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.tokens -= entry.tokens
        return entry

    def drop(self, request_id: str) -> None:
        """Forget an entry and release its blocks (the request ended)."""
        if self.take(request_id) is not None:
            self._release(request_id)

    def drop_oldest(self) -> str | None:
        """Give the oldest entry's blocks back for room; returns its request id (None: nothing is kept)."""
        if not self._entries:
            return None
        request_id, entry = self._entries.popitem(last=False)
        self.tokens -= entry.tokens
        self.evicted += 1
        self._release(request_id)
        return request_id
