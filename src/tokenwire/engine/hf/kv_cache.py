"""A slot-based KV cache that plugs into transformers' attention layers.

Every layer keeps K and V as ``[rows, kv_heads, capacity, head_dim]``. Row ``i`` belongs to the sequence
the scheduler put there; the buffers grow (rows in powers of two, positions in blocks) as sequences need
it and shrink when the engine is idle. Before each forward pass the runner says where the new keys go
(:meth:`plan`); the attention layers then call :meth:`update`, which writes
them in place and returns a view of the rows and positions to attend to. Nothing is recomputed and
nothing is copied per step except the new keys.

The last position of the buffers is a scratch column: padding queries of a batched prefill write there. It is
never inside the attended range (the engine keeps capacity above every sequence's length), and a sequence
that later reaches that position writes its real key before reading it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

POSITION_BLOCK = 256


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.rows_cap = 0
        self.len_cap = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # the plan for the next forward pass
        self._rows = slice(0, 0)
        self._write_rows = torch.zeros(0, 1, dtype=torch.long)
        self._write_pos = torch.zeros(0, 1, dtype=torch.long)
        self._kv_len = 0

    # -- capacity
    def bytes_per_position(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def ensure(self, rows: int, length: int) -> None:
        """Grow the buffers so that ``rows`` rows of ``length`` positions fit, keeping their contents."""
        if rows <= self.rows_cap and length <= self.len_cap:
            return
        new_rows = max(self.rows_cap, 1 << max(0, (rows - 1).bit_length()))
        new_len = max(self.len_cap, -(-length // POSITION_BLOCK) * POSITION_BLOCK)
        shape = (new_rows, self.kv_heads, new_len, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    old = store[layer]
                    fresh[: old.shape[0], :, : old.shape[2]] = old
                    store[layer] = fresh
                else:
                    store.append(fresh)
        self.rows_cap, self.len_cap = new_rows, new_len

    def release(self) -> None:
        """Free all memory (the engine is idle)."""
        self.keys.clear()
        self.values.clear()
        self.rows_cap = self.len_cap = 0

    def read_row(self, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of row ``row``'s keys and values at positions ``0..length-1``, per layer ``[kv_heads, length, d]``."""
        keys = [buf[row, :, :length].clone() for buf in self.keys]
        values = [buf[row, :, :length].clone() for buf in self.values]
        return keys, values

    def write_row(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Put keys and values (as :meth:`read_row` gave them) back at positions ``0..n-1`` of row ``row``."""
        for store, saved in ((self.keys, keys), (self.values, values)):
            for buf, part in zip(store, saved, strict=True):
                buf[row, :, : part.shape[1]] = part

    def swap_rows(self, i: int, j: int) -> None:
        for store in (self.keys, self.values):
            for buf in store:
                tmp = buf[i].clone()
                buf[i] = buf[j]
                buf[j] = tmp

    # -- plans
    def plan(self, first_row: int, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward pass covers rows ``first_row..first_row+k-1``; query ``j`` of row ``i`` writes its
        key at ``positions[i, j]`` (shape ``[k, q]``); every row attends to positions ``0..kv_len-1``."""
        k = positions.shape[0]
        self._rows = slice(first_row, first_row + k)
        self._write_rows = torch.arange(first_row, first_row + k, device=self.device)[:, None]  # [k, 1]
        self._write_pos = positions  # [k, q]
        self._kv_len = kv_len

    # -- the transformers Cache API used by attention layers
    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [k, kv_heads, q, head_dim]; the indexed buffer is [k, q, kv_heads, head_dim]
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[self._write_rows, :, self._write_pos] = key_states.transpose(1, 2).to(self.dtype)
        v_buf[self._write_rows, :, self._write_pos] = value_states.transpose(1, 2).to(self.dtype)
        return k_buf[self._rows, :, : self._kv_len], v_buf[self._rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:  # type: ignore[override]
        return self._kv_len, 0

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False
