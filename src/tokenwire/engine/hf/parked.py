"""The KV of paused requests, kept out of the batch while the KV budget allows.

A paused request leaves its KV-cache row (engine/loop.py): the row goes to someone else. Its keys and values are
copied here first, with the tokens they belong to, so that when it continues they are copied back instead of
computed again. What is kept is bounded: whenever the running rows need the room (their reserved KV positions
plus the kept ones would pass the KV budget, ``--kv-cache-tokens``), the oldest entries go first, and such a
request is then rebuilt from its prompt plus its generated tokens, as if nothing had been kept.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class ParkedKV:
    token_ids: list[int]  # the tokens at positions 0..n-1 whose keys and values these are
    keys: list[torch.Tensor]  # per layer, [kv_heads, n, head_dim]
    values: list[torch.Tensor]

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

    def __init__(self) -> None:
        self._entries: OrderedDict[str, ParkedKV] = OrderedDict()
        self.tokens = 0  # KV positions held, all entries together
        self.evicted = 0  # entries dropped for room, since the start

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def put(self, request_id: str, entry: ParkedKV) -> None:
        self.drop(request_id)
        self._entries[request_id] = entry
        self.tokens += entry.tokens

    def take(self, request_id: str) -> ParkedKV | None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.tokens -= entry.tokens
        return entry

    def drop(self, request_id: str) -> None:
        self.take(request_id)

    def shrink(self, max_tokens: int) -> int:
        """Drop the oldest entries until at most ``max_tokens`` positions are held; returns how many went."""
        dropped = 0
        while self._entries and self.tokens > max_tokens:
            _, entry = self._entries.popitem(last=False)
            self.tokens -= entry.tokens
            dropped += 1
        self.evicted += dropped
        return dropped
