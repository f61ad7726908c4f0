"""A block KV cache that plugs into transformers' attention layers through ``Cache.update``.

Every layer keeps K and V token-major, ``[blocks * block_tokens, kv_heads, head_dim]`` (the layout of transformers'
own paged cache). Block ``b`` of the block manager (engine/block_manager.py) is storage block ``b + 1``: storage
block 0 is scratch, where the padding queries of a batched prefill write and where a row's reads point past the end
of its block table (those positions are always masked; the storage starts zeroed, so a masked read is finite).

Before each forward pass the runner says, per row, which slots the new keys go to and which slots hold the
positions ``0..kv_len-1`` it attends to (:meth:`BlockKVCache.plan`, from the rows' block tables). Each attention
layer then calls :meth:`BlockKVCache.update`, which writes the new keys with ``index_copy_`` and gathers the rows'
keys and values with one ``index_select`` each: the model's own attention runs on the result, unchanged. The gather
is a copy of the attended positions per layer, the price of blocks on this path (docs/architecture.md measures
it); a paged attention kernel could later read the blocks in place.

The storage grows on demand (doubling, contents kept) up to the pool, and shrinks when the engine is idle to the
highest block still referenced or cached, so that the prefix cache survives between a chat's turns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

MIN_BLOCKS = 16  # the first allocation, scratch included


class BlockKVCache(Cache):
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        block_tokens: int,
        max_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks  # the block manager's pool
        self.dtype = dtype
        self.device = device
        self.capacity_blocks = 0  # storage blocks allocated, scratch included
        self.keys: list[torch.Tensor] = []  # per layer [capacity_blocks * block_tokens, kv_heads, head_dim]
        self.values: list[torch.Tensor] = []
        # the plan for the next forward pass
        self._write = torch.zeros(0, dtype=torch.long)  # [k * q] slots of the new keys
        self._read = torch.zeros(0, 0, dtype=torch.long)  # [k, kv_len] slots of the attended positions

    # -- capacity
    @property
    def capacity_tokens(self) -> int:
        """Positions allocated for sequences (the scratch block not counted)."""
        return max(0, self.capacity_blocks - 1) * self.block_tokens

    def ensure_blocks(self, num_blocks: int) -> None:
        """Storage for the manager's blocks ``0..num_blocks-1``, keeping what is stored."""
        if num_blocks > self.max_blocks:
            raise ValueError(f"block {num_blocks - 1} is outside the pool of {self.max_blocks} blocks")
        needed = num_blocks + 1
        if needed <= self.capacity_blocks:
            return
        self._resize(min(self.max_blocks + 1, max(needed, MIN_BLOCKS, 2 * self.capacity_blocks)))

    def shrink(self, num_blocks: int) -> None:
        """Keep storage for the manager's blocks ``0..num_blocks-1`` only (none: free it all)."""
        if num_blocks == 0:
            self.release()
        elif num_blocks + 1 < self.capacity_blocks:
            self._resize(num_blocks + 1)

    def release(self) -> None:
        """Free all memory (what the blocks held is gone: the block manager must forget it too)."""
        self.keys.clear()
        self.values.clear()
        self.capacity_blocks = 0

    def _resize(self, blocks: int) -> None:
        shape = (blocks * self.block_tokens, self.kv_heads, self.head_dim)
        keep = min(blocks, self.capacity_blocks) * self.block_tokens
        fresh: list[list[torch.Tensor]] = []
        for store in (self.keys, self.values):
            layers = []
            for layer in range(self.num_layers):
                buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    buf[:keep] = store[layer][:keep]
                layers.append(buf)
            fresh.append(layers)
        self.keys, self.values = fresh  # all or nothing: a failed allocation leaves the old storage whole
        self.capacity_blocks = blocks

    # -- plans
    def read_slots(self, tables: Sequence[Sequence[int]], kv_len: int) -> torch.Tensor:
        """``[k, kv_len]`` (on the CPU): the storage slot of positions ``0..kv_len-1`` of each row, given the rows'
        block tables (block manager ids); the scratch block past the end of a row's table."""
        b = self.block_tokens
        width = -(-kv_len // b)
        padded = [list(t[:width]) + [-1] * (width - min(len(t), width)) for t in tables]
        storage = torch.tensor(padded, dtype=torch.long).add_(1)  # [k, width]; -1 (none) -> 0 (scratch)
        slots = storage[:, :, None] * b + torch.arange(b)  # [k, width, b]
        return slots.view(len(tables), width * b)[:, :kv_len]

    def plan(self, write: torch.Tensor, read: torch.Tensor) -> None:
        """The next forward pass: query ``j`` of row ``i`` writes its key and value at slot ``write[i, j]`` (shape
        ``[k, q]``; 0, scratch, for padding), and row ``i`` attends to the slots ``read[i]`` (shape ``[k, kv_len]``).
        Every block a slot names must have storage (:meth:`ensure_blocks`)."""
        self._write = write.reshape(-1).to(self.device)
        self._read = read.to(self.device)

    # -- the transformers Cache API used by attention layers
    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [k, kv_heads, q, head_dim] -> token-major [k * q, kv_heads, head_dim]
        k, _, q, d = key_states.shape
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf.index_copy_(0, self._write, key_states.transpose(1, 2).reshape(k * q, self.kv_heads, d).to(self.dtype))
        v_buf.index_copy_(0, self._write, value_states.transpose(1, 2).reshape(k * q, self.kv_heads, d).to(self.dtype))
        rows, kv_len = self._read.shape
        flat = self._read.reshape(-1)
        # [rows * kv_len, kv_heads, d] -> [rows, kv_heads, kv_len, d]; not made contiguous (measured slower)
        keys = k_buf.index_select(0, flat).view(rows, kv_len, self.kv_heads, d).transpose(1, 2)
        values = v_buf.index_select(0, flat).view(rows, kv_len, self.kv_heads, d).transpose(1, 2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self._read.shape[1])

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:  # type: ignore[override]
        return int(self._read.shape[1]), 0

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False
