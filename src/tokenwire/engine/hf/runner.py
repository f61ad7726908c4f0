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
    def prefill(self, row: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Feed prompt tokens ``start..start+len-1`` of row ``row``; returns the last position's logits [1, V]."""
        end = start + len(token_ids)
        self.cache.plan_prefill(row, start, end)
        ids = torch.tensor([token_ids], device=self.device)  # [1, q]
        positions = torch.arange(start, end, device=self.device)[None, :]  # [1, q]
        keys = torch.arange(end, device=self.device)
        mask = keys[None, :] <= positions[0, :, None]  # [q, kv]: causal, offset by start
        return self._forward(ids, positions, mask[None, None])

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows ``0..n-1``, at the given positions; returns logits [n, V]."""
        n = len(token_ids)
        kv_len = max(positions) + 1
        pos = torch.tensor(positions, device=self.device)  # [n]
        self.cache.plan_decode(n, pos, kv_len)
        ids = torch.tensor(token_ids, device=self.device)[:, None]  # [n, 1]
        mask = torch.arange(kv_len, device=self.device)[None, :] <= pos[:, None]  # [n, kv]
        return self._forward(ids, pos[:, None], mask[:, None, None, :])

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
