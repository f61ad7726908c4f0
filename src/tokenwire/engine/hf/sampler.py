"""Per-request sampling for a batch of logits, each row with its own parameters and random generator."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from tokenwire.engine.interface import SamplingParams


@dataclass(slots=True, frozen=True)
class SamplingFailure:
    """Why one row of a batch could not be sampled."""

    reason: str


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
    ) -> list[int | SamplingFailure]:
        """One token per row, or a :class:`SamplingFailure` for a row that cannot be sampled (its logits or
        probabilities are not finite, its penalties fail): that row's request fails, the other rows are served."""
        n = logits.shape[0]
        result: list[int | SamplingFailure] = [0] * n
        for i, p in enumerate(params):
            if p.uses_penalties:
                try:
                    _apply_penalties(logits[i], p, prompt_ids[i], output_ids[i])
                except Exception as exc:
                    result[i] = SamplingFailure(f"the penalties could not be applied: {exc}")
        unusable = torch.isnan(logits).any(dim=-1) | (logits == float("inf")).any(dim=-1)
        unusable |= (logits == float("-inf")).all(dim=-1)
        for i in unusable.nonzero().flatten().tolist():
            result[i] = SamplingFailure("the model produced no finite scores for this request")
        live = [i for i in range(n) if not isinstance(result[i], SamplingFailure)]
        greedy = [i for i in live if params[i].greedy]
        if greedy:
            best = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < n else logits.argmax(dim=-1).tolist()
            for i, t in zip(greedy, best, strict=True):
                result[i] = int(t)
        rows = [i for i in live if not params[i].greedy]
        if not rows:
            return result
        sub = logits[rows] if len(rows) < n else logits
        sub_params = [params[i] for i in rows]
        temps = torch.tensor([p.temperature for p in sub_params], device=logits.device, dtype=logits.dtype)
        scaled = sub / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub_params):
            scaled = _filter(scaled, sub_params)
        probs = torch.softmax(scaled, dim=-1)
        usable = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        for j, i in enumerate(rows):
            if not usable[j]:
                result[i] = SamplingFailure("the sampling distribution for this request is not finite")
                continue
            try:
                token = torch.multinomial(probs[j], 1, generator=self._generators[request_ids[i]])
            except RuntimeError as exc:
                result[i] = SamplingFailure(f"sampling failed: {exc}")
                continue
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
