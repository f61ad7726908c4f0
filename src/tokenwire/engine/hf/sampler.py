"""Per-request sampling for a batch of logits, each row with its own parameters and random generator."""

from __future__ import annotations

import secrets

import torch

from tokenwire.engine.interface import SamplingParams


class RowSampler:
    """Holds the random generator of each running request (seeded ones are reproducible)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def add(self, request_id: str, seed: int | None) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        self._generators[request_id] = gen

    def remove(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,  # [n, V], float32
        request_ids: list[str],
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
    ) -> list[int]:
        n = logits.shape[0]
        for i, p in enumerate(params):
            if p.uses_penalties:
                _apply_penalties(logits[i], p, prompt_ids[i], output_ids[i])
        greedy = [p.greedy for p in params]
        if all(greedy):
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        result = [0] * n
        rows = [i for i in range(n) if not greedy[i]]
        if len(rows) < n:
            for i, t in zip(range(n), logits.argmax(dim=-1).tolist(), strict=True):
                result[i] = int(t)
        sub = logits[rows] if len(rows) < n else logits
        sub_params = [params[i] for i in rows]
        temps = torch.tensor([p.temperature for p in sub_params], device=logits.device, dtype=logits.dtype)
        scaled = sub / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub_params):
            scaled = _filter(scaled, sub_params)
        probs = torch.softmax(scaled, dim=-1)
        for j, i in enumerate(rows):
            token = torch.multinomial(probs[j], 1, generator=self._generators[request_ids[i]])
            result[i] = int(token.item())
        return result


def _apply_penalties(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> None:
    """Repetition penalty (over prompt and output, as in transformers); presence and frequency penalties
    (over the output, as in OpenAI's API)."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=row.device, dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
        ids = torch.tensor(output, device=row.device, dtype=torch.long)
        counts = torch.bincount(ids, minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask out tokens outside each row's top-k, top-p (nucleus) and min-p sets."""
    vocab = scaled.shape[-1]
    dev = scaled.device
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    ps = torch.tensor([p.top_p for p in params], device=dev, dtype=scaled.dtype)
    mins = torch.tensor([p.min_p for p in params], device=dev, dtype=scaled.dtype)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= ks[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) > ps[:, None]  # keeps the token that crosses top_p
    drop |= probs < mins[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
