"""Runs the transformers model over the block KV cache: prefill chunks and batched decode steps.

The runner builds the attention masks itself (a 4D mask over the block cache's slots), and transformers hands a
4D mask to every layer as it is. So a model with a sliding attention window gets its window here: Mistral's
(every layer) in the one mask, Gemma 2/3's (some layers) as a mask per layer kind, which those models take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenwire.engine.hf.kv_cache import BlockKVCache


class ModelRunner:
    def __init__(
        self,
        model: Any,
        device: torch.device,
        dtype: torch.dtype,
        block_tokens: int,
        max_blocks: int,
        table_of: Callable[[int], Sequence[int]],
    ) -> None:
        """``table_of(row)`` is the block table (block manager ids) of the sequence at that row of the batch."""
        self.model = model
        self.device = device
        self.table_of = table_of
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = BlockKVCache(cfg.num_hidden_layers, kv_heads, head_dim, block_tokens, max_blocks, dtype, device)
        self.vocab_size = int(cfg.vocab_size)
        kinds = set(getattr(cfg, "layer_types", None) or ())
        window = getattr(cfg, "sliding_window", None)
        self.window: int | None = int(window) if window and (not kinds or "sliding_attention" in kinds) else None
        self.per_kind = "sliding_attention" in kinds  # a mask per layer kind (Gemma 2/3); else one for all
        # eager attention adds its mask to the scores: 0 where allowed, the dtype's lowest elsewhere
        self.additive = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.dtype = dtype

    @torch.inference_mode()
    def prefill(self, first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed prompt chunks of rows ``first_row..first_row+k-1`` in one forward pass; chunk ``i`` holds prompt
        positions ``starts[i]..starts[i]+len-1``. Returns each row's logits at its last position, [k, V].

        Chunks are left-padded to one length so that every row's last token is the last query; padding queries
        write to the cache's scratch block and their outputs are ignored."""
        k, q = len(chunks), max(len(c) for c in chunks)
        ids = torch.zeros(k, q, dtype=torch.long)
        pos = torch.empty(k, q, dtype=torch.long)
        real = torch.zeros(k, q, dtype=torch.bool)
        for i, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            pad = q - len(chunk)
            ids[i, pad:] = torch.tensor(chunk)
            pos[i, pad:] = torch.arange(start, start + len(chunk))
            pos[i, :pad] = start  # any valid position: padding outputs are discarded
            real[i, pad:] = True
        kv_len = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
        read = self._read_slots(first_row, k, kv_len)  # [k, kv_len]
        write = torch.where(real, read.gather(1, pos), 0)  # [k, q]; padding -> scratch
        self.cache.plan(write, read)
        ids, pos = ids.to(self.device), pos.to(self.device)
        return self._forward(ids, pos, self._masks(pos, kv_len))

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], first_row: int = 0) -> torch.Tensor:
        """One token for each of rows ``first_row..first_row+n-1``, at the given positions; returns logits [n, V]."""
        kv_len = max(positions) + 1
        pos = torch.tensor(positions)[:, None]  # [n, 1]
        read = self._read_slots(first_row, len(positions), kv_len)
        self.cache.plan(read.gather(1, pos), read)
        pos = pos.to(self.device)
        ids = torch.tensor(token_ids, device=self.device)[:, None]  # [n, 1]
        return self._forward(ids, pos, self._masks(pos, kv_len))

    def _masks(self, pos: torch.Tensor, kv_len: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Causal masks for queries at ``pos`` [rows, q] over ``kv_len`` slots: [rows, 1, q, kv], banded to the
        sliding window where the model has one (per layer kind when only some layers slide)."""
        slots = torch.arange(kv_len, device=self.device)[None, None, :]
        causal = slots <= pos[:, :, None]  # [rows, q, kv]
        if self.window is None:
            return self._form(causal)
        sliding = self._form(causal & (slots > pos[:, :, None] - self.window))
        if not self.per_kind:
            return sliding
        return {"full_attention": self._form(causal), "sliding_attention": sliding}

    def _form(self, allowed: torch.Tensor) -> torch.Tensor:
        """[rows, q, kv] booleans as the attention takes them: [rows, 1, q, kv], additive for eager attention."""
        if not self.additive:
            return allowed[:, None]
        low = torch.finfo(self.dtype).min
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, low)[:, None]

    def _read_slots(self, first_row: int, k: int, kv_len: int) -> torch.Tensor:
        tables = [self.table_of(first_row + i) for i in range(k)]
        self.cache.ensure_blocks(max((max(t) + 1 for t in tables if t), default=0))
        return self.cache.read_slots(tables, kv_len)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | dict[str, torch.Tensor]
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits
