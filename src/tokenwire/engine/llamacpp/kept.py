"""Which llama.cpp sequence ids are in use, and the sequences kept after they left the batch.

A request runs as one llama.cpp sequence. When it is paused (its reader is behind) or ends, its KV cells are kept
under its sequence id while room allows: a paused request that comes back goes on from them, and any new request
whose prompt starts with the same tokens (a shared system prompt, a chat's previous turn) gets them copied into its
own sequence (cells are shared in the unified cache, so a copy costs nothing). The oldest kept sequence gives way
first, when admission needs its blocks or a new request needs a sequence id. Plain Python: tested without llama.cpp.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Kept:
    """A sequence kept out of the batch: its id, and the tokens whose cells it holds (positions 0..len-1)."""

    seq: int
    tokens: list[int]
    paused: bool  # its request may come back (else it ended: it only serves as a prefix)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SequenceIds:
    """llama.cpp sequence ids 0..n-1: taken by requests, given back when their cells are gone."""

    def __init__(self, n: int) -> None:
        self._free = list(range(n - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no llama.cpp sequence id is free")
        return self._free.pop()

    def give_back(self, seq: int) -> None:
        self._free.append(seq)


class KeptSequences:
    """Kept sequences by the key their blocks are held under in the scheduler's pool, oldest first."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, Kept] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: object) -> bool:
        return key in self._kept

    @property
    def tokens(self) -> int:
        return sum(len(k.tokens) for k in self._kept.values())

    @property
    def paused_tokens(self) -> int:
        """The tokens kept for paused requests (the rest are ended ones', kept as prefixes)."""
        return sum(len(k.tokens) for k in self._kept.values() if k.paused)

    def put(self, key: str, kept: Kept) -> None:
        self._kept.pop(key, None)
        self._kept[key] = kept

    def take(self, key: str) -> Kept | None:
        return self._kept.pop(key, None)

    def oldest(self) -> str | None:
        return next(iter(self._kept), None)

    def best_donor(self, prompt: list[int], running: Iterable[tuple[int, list[int]]] = ()) -> tuple[int, int]:
        """The sequence (kept, or ``running``: id and the tokens it has computed) holding the longest prefix of
        ``prompt``, and that length: (-1, 0) when none shares a token. A kept one used is the newest again."""
        best, length, key = -1, 0, None
        for k, kept in self._kept.items():
            n = common_prefix(kept.tokens, prompt)
            if n > length:
                best, length, key = kept.seq, n, k
        for seq, tokens in running:
            n = common_prefix(tokens, prompt)
            if n > length:
                best, length, key = seq, n, None
        if key is not None:
            self._kept.move_to_end(key)
        return best, length
