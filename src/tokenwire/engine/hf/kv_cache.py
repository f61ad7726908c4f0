"""A slot-based KV cache that plugs into transformers' attention layers.

Every layer keeps K and V as ``[rows, kv_heads, capacity, head_dim]``. Row ``i`` belongs to the sequence
the scheduler put there; the buffers grow (rows in powers of two, positions in blocks) as sequences need
it and shrink when the engine is idle. Before each forward pass the runner says where the new keys go
(:meth:`plan_decode` or :meth:`plan_prefill`); the attention layers then call :meth:`update`, which writes
them in place and returns a view of the rows and positions to attend to. Nothing is recomputed and
nothing is copied per step except the new keys.
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
        self._write_rows: torch.Tensor | None = None  # [n] for decode
        self._write_pos: torch.Tensor | slice = slice(0, 0)
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

    def swap_rows(self, i: int, j: int) -> None:
        for store in (self.keys, self.values):
            for buf in store:
                tmp = buf[i].clone()
                buf[i] = buf[j]
                buf[j] = tmp

    # -- plans
    def plan_decode(self, num_rows: int, positions: torch.Tensor, kv_len: int) -> None:
        """Rows ``0..num_rows-1`` each add one key at ``positions[row]``; attend to ``kv_len`` positions."""
        self._rows = slice(0, num_rows)
        self._write_rows = torch.arange(num_rows, device=self.device)
        self._write_pos = positions
        self._kv_len = kv_len

    def plan_prefill(self, row: int, start: int, end: int) -> None:
        """Row ``row`` adds keys for positions ``start..end-1`` and attends to ``0..end-1``."""
        self._rows = slice(row, row + 1)
        self._write_rows = None
        self._write_pos = slice(start, end)
        self._kv_len = end

    # -- the transformers Cache API used by attention layers
    def update(  # type: ignore[override]
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [B, kv_heads, q_len, head_dim]
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._write_rows is not None:  # decode: q_len == 1, one position per row
            k_buf[self._write_rows, :, self._write_pos] = key_states[:, :, 0].to(self.dtype)
            v_buf[self._write_rows, :, self._write_pos] = value_states[:, :, 0].to(self.dtype)
        else:
            k_buf[self._rows, :, self._write_pos] = key_states.to(self.dtype)
            v_buf[self._rows, :, self._write_pos] = value_states.to(self.dtype)
        return k_buf[self._rows, :, : self._kv_len], v_buf[self._rows, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:  # type: ignore[override]
        return self._kv_len, 0

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False
