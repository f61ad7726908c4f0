"""Fixed-size KV-cache blocks, a block table per sequence, and a prefix cache of full blocks. Plain Python, no torch.

The KV storage (kv_cache.py) is a pool of ``num_blocks`` blocks of ``block_tokens`` positions each; position ``p`` of
a sequence lives in slot ``table[p // block_tokens] * block_tokens + p % block_tokens``. This module decides which
block holds what; it never touches a tensor.

Lifecycle of a sequence (nano-vllm's block_manager.py is the model, with chunked prefill in mind):

- :meth:`BlockManager.allocate` creates its table: the leading *full* blocks of its tokens that the prefix cache
  holds are shared (reference counted, read-only), and fresh blocks cover the positions up to ``num_tokens``. It
  returns how many tokens were found (``cached_tokens``): prefill starts there. The last token is never taken
  from the cache (its logits are what the first new token is sampled from).
- :meth:`BlockManager.ensure` grows the table as the sequence grows (a prefill chunk, a decode step).
- :meth:`BlockManager.commit` registers the blocks that became full *and computed* in the prefix cache, keyed by a
  hash chained over every block before them: only then can another sequence reuse them (a block of a prefill chunk
  that has not run yet holds nothing).
- :meth:`BlockManager.free` drops its references. A block nobody references goes back to the pool: a registered one
  stays cached (its KV is kept) and is evicted least recently used first, only when a fresh block is needed and no
  never-used block is left; an unregistered one (partial, or a duplicate) is free at once.

Only positions at or after ``cached_tokens`` are ever written, and those always lie in blocks the sequence owns
alone (shared blocks are full and before that point), so shared blocks need no copy-on-write.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Block", "BlockManager", "BlockTable", "OutOfBlocks", "chain_hash"]


class OutOfBlocks(RuntimeError):
    """The pool has no block left for a request that was not checked first (``can_allocate`` / ``can_ensure``)."""


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The key of a full block: its tokens and the key of the block before it (None for the first block).

    blake2b rather than ``hash()``: stable across processes and Python versions. A hit is still checked against the
    block's tokens, so a collision can cost a miss, never a wrong answer."""
    h = hashlib.blake2b(digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full, computed and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens of a registered block (to confirm a hash hit)


@dataclass(slots=True)
class BlockTable:
    """One sequence's blocks: position ``p`` is in ``block_ids[p // block_tokens]``."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions 0..num_tokens-1 have a slot
    num_committed: int = 0  # leading full blocks whose chain hash is known (registered, or duplicates of one)
    last_hash: int | None = None  # chain hash of block num_committed-1
    cached_tokens: int = 0  # positions found in the prefix cache when it was allocated


class BlockManager:
    """Blocks of ``block_tokens`` positions, ``num_blocks`` of them, handed to sequences by id."""

    def __init__(self, num_blocks: int, block_tokens: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, not {num_blocks}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, not {block_tokens}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks))  # a min-heap: low ids first keeps the storage compact
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced registered blocks, least recent first
        self._by_hash: dict[int, int] = {}  # chain hash -> block id
        self._tables: dict[str, BlockTable] = {}
        # counters since the start (metrics)
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    # -- queries
    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tables

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing worth keeping."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks nobody references that keep a prefix's KV until their space is needed."""
        return len(self._cached)

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation may take: the free ones, then the cached ones (evicted)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_available_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` positions span."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, not {num_tokens}")
        return -(-num_tokens // self.block_tokens)

    def table(self, seq_id: str) -> BlockTable:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}") from None

    def high_water(self) -> int:
        """One past the highest block id referenced or cached: the storage may shrink to this many blocks."""
        top = -1
        for block in self.blocks:
            if block.ref_count > 0 or block.block_id in self._cached:
                top = max(top, block.block_id)
        return top + 1

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Physical slots (``block * block_tokens + offset``) of positions ``start..end-1`` of a sequence."""
        t = self.table(seq_id)
        if not 0 <= start <= end <= t.num_tokens:
            raise ValueError(f"positions {start}..{end} are outside 0..{t.num_tokens} of {seq_id!r}")
        b = self.block_tokens
        return [t.block_ids[p // b] * b + p % b for p in range(start, end)]

    def match(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens the prefix cache holds for this prompt (whole blocks, never its last token).
        No side effects."""
        return len(self._match(token_ids)) * self.block_tokens

    def can_allocate(self, token_ids: Sequence[int], num_tokens: int | None = None, reserve_blocks: int = 0) -> bool:
        """Whether :meth:`allocate` with these arguments would succeed and leave ``reserve_blocks`` available (a
        headroom for the running sequences' next positions)."""
        n = self._check_num_tokens(token_ids, num_tokens)
        if reserve_blocks < 0:
            raise ValueError(f"reserve_blocks must be >= 0, not {reserve_blocks}")
        hits = self._match(token_ids)
        idle_hits = sum(1 for i in hits if self.blocks[i].ref_count == 0)  # cached now: taking them uses room
        fresh = max(0, self.blocks_for(n) - len(hits))
        return fresh + idle_hits + reserve_blocks <= self.num_available_blocks

    def can_ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Whether :meth:`ensure` can give positions up to ``num_tokens`` a slot."""
        t = self.table(seq_id)
        return self.blocks_for(num_tokens) - len(t.block_ids) <= self.num_available_blocks

    # -- changes
    def allocate(self, seq_id: str, token_ids: Sequence[int], num_tokens: int | None = None) -> int:
        """Create the block table of ``seq_id`` for a prompt: reuse the cached prefix, and give positions
        ``0..num_tokens-1`` (default: every token) a slot. Returns the cached tokens (prefill starts there).
        Raises OutOfBlocks, with nothing changed, when the pool cannot hold it."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        n = self._check_num_tokens(token_ids, num_tokens)
        if not self.can_allocate(token_ids, n):
            raise OutOfBlocks(f"no room for {self.blocks_for(n)} blocks of {seq_id!r}")
        hits = self._match(token_ids)
        table = BlockTable()
        parent: int | None = None
        for block_id in hits:
            self._acquire(block_id)
            table.block_ids.append(block_id)
            parent = self.blocks[block_id].hash
        cached = len(hits) * self.block_tokens
        table.num_tokens = cached
        table.num_committed = len(hits)
        table.last_hash = parent
        table.cached_tokens = cached
        self._tables[seq_id] = table
        if self.prefix_caching:
            self.queried_tokens += len(token_ids)
            self.hit_tokens += cached
        self.ensure(seq_id, max(n, cached))
        return cached

    def ensure(self, seq_id: str, num_tokens: int) -> None:
        """Give positions ``0..num_tokens-1`` of ``seq_id`` a slot, taking fresh blocks as needed (never fewer
        positions: a table only grows). Raises OutOfBlocks, with nothing changed, when the pool is short."""
        t = self.table(seq_id)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, not {num_tokens}")
        needed = self.blocks_for(num_tokens) - len(t.block_ids)
        if needed > self.num_available_blocks:
            raise OutOfBlocks(f"{seq_id!r} needs {needed} more blocks, {self.num_available_blocks} are available")
        for _ in range(max(0, needed)):
            t.block_ids.append(self._take())
        t.num_tokens = max(t.num_tokens, num_tokens)

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Register in the prefix cache every block of ``seq_id`` that is full within its first ``num_computed``
        positions, whose KV is now computed. ``token_ids`` are the sequence's tokens (at least ``num_computed``).
        A block whose content another block already holds stays unregistered (freed when the sequence ends)."""
        t = self.table(seq_id)
        if not 0 <= num_computed <= min(len(token_ids), t.num_tokens):
            raise ValueError(
                f"num_computed {num_computed} is outside 0..{min(len(token_ids), t.num_tokens)} for {seq_id!r}"
            )
        if not self.prefix_caching:
            return
        b = self.block_tokens
        for i in range(t.num_committed, num_computed // b):
            tokens = tuple(token_ids[i * b : (i + 1) * b])
            key = chain_hash(t.last_hash, tokens)
            block = self.blocks[t.block_ids[i]]
            if key not in self._by_hash and block.hash is None:
                block.hash, block.token_ids = key, tokens
                self._by_hash[key] = block.block_id
            t.last_hash = key
            t.num_committed = i + 1

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s references (it ended, was preempted, or its kept KV gave way). Registered blocks stay
        cached, the last block of the sequence first in line for eviction (a chain is only found from its start)."""
        t = self._tables.pop(seq_id, None)
        if t is None:
            raise ValueError(f"unknown sequence {seq_id!r}")
        for block_id in reversed(t.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None and self.prefix_caching:
                self._cached[block_id] = None  # most recently used end
            else:
                self._forget(block)
                heapq.heappush(self._free, block_id)

    def clear_cache(self) -> int:
        """Evict every cached block (their KV is dropped); returns how many."""
        n = len(self._cached)
        while self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._forget(self.blocks[block_id])
            heapq.heappush(self._free, block_id)
        self.evicted_blocks += n
        return n

    # -- internals
    def _check_num_tokens(self, token_ids: Sequence[int], num_tokens: int | None) -> int:
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        n = len(token_ids) if num_tokens is None else num_tokens
        if not 0 <= n <= len(token_ids):
            raise ValueError(f"num_tokens {n} is outside 0..{len(token_ids)}")
        return n

    def _match(self, token_ids: Sequence[int]) -> list[int]:
        if not self.prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        b = self.block_tokens
        for i in range((len(token_ids) - 1) // b):  # whole blocks before the last token
            tokens = tuple(token_ids[i * b : (i + 1) * b])
            parent = chain_hash(parent, tokens)
            block_id = self._by_hash.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]
        block.ref_count += 1

    def _take(self) -> int:
        """A fresh block: a never-used one if any, else the least recently used cached one (evicted)."""
        if self._free:
            block_id = heapq.heappop(self._free)
        elif self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._forget(self.blocks[block_id])
            self.evicted_blocks += 1
        else:  # callers check the room first
            raise OutOfBlocks("no block left")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]
        block.hash = None
        block.token_ids = ()
