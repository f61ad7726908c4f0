"""Runs the transformers model over the slot KV cache: prefill chunks and batched decode steps."""

from __future__ import annotations

from typing import Any

import torch

from tokenwire.engine.hf.kv_cache import SlotKVCache


class ModelRunner:
    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = SlotKVCache(cfg.num_hidden_layers, kv_heads, head_dim, dtype, device)
        self.vocab_size = int(cfg.vocab_size)

    @torch.inference_mode()
    def prefill(self, first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed prompt chunks of rows ``first_row..first_row+k-1`` in one forward pass; chunk ``i`` holds prompt
        positions ``starts[i]..starts[i]+len-1``. Returns each row's logits at its last position, [k, V].

        Chunks are left-padded to one length so that every row's last token is the last query; padding queries
        write to the cache's scratch column and their outputs are ignored."""
        k, q = len(chunks), max(len(c) for c in chunks)
        scratch = self.cache.len_cap - 1
        ids = torch.zeros(k, q, dtype=torch.long)
        pos = torch.empty(k, q, dtype=torch.long)
        write = torch.full((k, q), scratch, dtype=torch.long)
        for i, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            pad = q - len(chunk)
            ids[i, pad:] = torch.tensor(chunk)
            real = torch.arange(start, start + len(chunk))
            pos[i, pad:] = real
            pos[i, :pad] = start  # any valid position: padding outputs are discarded
            write[i, pad:] = real
        kv_len = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
        ids, pos, write = ids.to(self.device), pos.to(self.device), write.to(self.device)
        self.cache.plan(first_row, write, kv_len)
        mask = torch.arange(kv_len, device=self.device)[None, None, :] <= pos[:, :, None]  # [k, q, kv]
        return self._forward(ids, pos, mask[:, None])

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], first_row: int = 0) -> torch.Tensor:
        """One token for each of rows ``first_row..first_row+n-1``, at the given positions; returns logits [n, V]."""
        kv_len = max(positions) + 1
        pos = torch.tensor(positions, device=self.device)[:, None]  # [n, 1]
        self.cache.plan(first_row, pos, kv_len)
        ids = torch.tensor(token_ids, device=self.device)[:, None]  # [n, 1]
        mask = torch.arange(kv_len, device=self.device)[None, None, :] <= pos[:, :, None]  # [n, 1, kv]
        return self._forward(ids, pos, mask[:, None])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
