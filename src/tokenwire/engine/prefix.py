"""Which prompt tokens a paged prefix cache already holds, counted the way such a cache finds them.

A paged KV cache with prefix caching (OpenVINO GenAI's, vLLM's) keeps the blocks of a finished sequence, keyed
by a hash chained over the full blocks before them; a new prompt reuses the leading full blocks whose chain is
known, and computes at least its last token. OpenVINO's pipeline does not report how many tokens it reused, so
the worker keeps this index beside it: the same block size, the same chaining, the blocks of every sequence that
ended (prompt and generated tokens), least recently used dropped first once the KV cache's block count is
reached. What it counts is reported as ``cached_tokens``; the pipeline may have evicted a block sooner, under
memory pressure, so the figure is an upper bound then. Plain Python, tested without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence


class PrefixIndex:
    def __init__(self, block_tokens: int, capacity_blocks: int) -> None:
        if block_tokens < 1 or capacity_blocks < 1:
            raise ValueError("block_tokens and capacity_blocks must be >= 1")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, token_ids: Sequence[int], limit: int) -> Iterator[int]:
        """The chained hash of each full block among the first ``limit`` tokens."""
        parent = 0
        b = self.block_tokens
        for start in range(0, limit - b + 1, b):
            parent = hash((parent, tuple(token_ids[start : start + b])))
            yield parent

    def match(self, prompt_ids: Sequence[int]) -> int:
        """How many of the prompt's leading tokens are cached (whole blocks; never its last token)."""
        hits = 0
        for key in self._chain(prompt_ids, len(prompt_ids) - 1):
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hits += self.block_tokens
        return hits

    def insert(self, token_ids: Sequence[int]) -> None:
        """Remember the full blocks of a sequence whose KV the cache keeps (it ended)."""
        for key in self._chain(token_ids, len(token_ids)):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
