"""The row sampler: each row its own distribution and generator; a row that cannot be sampled fails alone."""

from __future__ import annotations

import math

import pytest
import torch

from tokenwire.engine.hf.sampler import RowSampler, SamplingFailure
from tokenwire.engine.interface import SamplingParams


def test_sampled_tokens_follow_each_rows_distribution() -> None:
    """Two rows with different distributions, 20,000 draws each (seeded): frequencies within 0.015 of the
    probabilities, and a temperature of 0.5 sharpens the second row as softmax(logits / 0.5) says."""
    sampler = RowSampler(torch.device("cpu"))
    sampler.add("a", 1)
    sampler.add("b", 2)
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5)]
    counts = torch.zeros(2, 4)
    for _ in range(20_000):
        tokens = sampler.sample(probs.log(), ["a", "b"], params, [[0], [0]], [[], []])
        for row, token in enumerate(tokens):
            assert isinstance(token, int)
            counts[row, token] += 1
    expected = torch.stack([probs[0], torch.softmax(probs[1].log() / 0.5, dim=-1)])
    assert torch.allclose(counts / 20_000, expected, atol=0.015), counts / 20_000


def test_the_same_seed_draws_the_same_tokens() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        sampler = RowSampler(torch.device("cpu"))
        for rid in "xyz":
            sampler.add(rid, 42)
        params = [SamplingParams(temperature=0.9, top_p=0.8)] * 3
        runs.append([sampler.sample(logits.clone(), list("xyz"), params, [[]] * 3, [[]] * 3) for _ in range(20)])
    assert runs[0] == runs[1]


def test_a_seed_draws_the_same_tokens_whatever_the_models_device() -> None:
    """The generators live on the CPU whatever the model's device (on CUDA a device generator could not serve
    the CPU draws: every sampled request failed there). A sampler made for "cuda" needs no GPU to be made, and
    its seeded draws equal the CPU sampler's."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    runs = []
    for device in ("cpu", "cuda"):
        sampler = RowSampler(torch.device(device))
        sampler.add("a", 7)
        sampler.add("b", 8)
        params = [SamplingParams(temperature=0.8)] * 2
        runs.append([sampler.sample(logits.clone(), ["a", "b"], params, [[]] * 2, [[]] * 2) for _ in range(10)])
    assert runs[0] == runs[1]


def test_a_row_of_nan_or_inf_fails_alone_greedy_or_sampled() -> None:
    sampler = RowSampler(torch.device("cpu"))
    for rid in "abcd":
        sampler.add(rid, 0)
    logits = torch.randn(4, 50)
    logits[1, 7] = math.nan
    logits[3, 3] = math.inf
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(), SamplingParams()]
    out = sampler.sample(logits, list("abcd"), params, [[]] * 4, [[]] * 4)
    assert out[0] == int(logits[0].argmax()) and isinstance(out[2], int)
    assert isinstance(out[1], SamplingFailure) and isinstance(out[3], SamplingFailure)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=40),
        SamplingParams(temperature=1.3, min_p=0.05),
        SamplingParams(temperature=0.9, top_k=3000, top_p=0.95),  # a top_k past the candidates
        SamplingParams(temperature=10.0, top_p=0.999),  # nearly flat: the nucleus is not among the candidates
    ],
)
def test_the_filters_keep_the_same_tokens_and_draw_the_same_ones_looking_at_candidates_first(
    params: SamplingParams,
) -> None:
    """top-k, top-p and min-p over each row's 1024 most likely tokens give the tokens a sort of the whole vocabulary
    keeps, with the same scores, and the same seeded draws; a row whose sets reach past them is done whole."""
    from tokenwire.engine.hf import sampler as sampling

    torch.manual_seed(0)
    logits = torch.randn(6, 49152) * 4
    scaled = logits / params.temperature
    values, ids = sampling._filter(scaled, [params] * 6)
    full = _filter_whole(scaled, params)
    if ids is None:  # done whole
        assert torch.equal(values, full)
    else:
        kept = torch.full_like(full, float("-inf")).scatter_(1, ids, values)
        assert torch.equal(kept, full)
    flat = 0.99 < params.top_p < 1
    assert (ids is None) == flat  # only the flat rows needed the whole vocabulary

    def draws(candidates: int) -> list[int | sampling.SamplingFailure]:
        old, sampling.CANDIDATES = sampling.CANDIDATES, candidates
        try:
            s = RowSampler(torch.device("cpu"))
            rids = [f"r{i}" for i in range(6)]
            for i, rid in enumerate(rids):
                s.add(rid, 100 + i)
            return [t for _ in range(20) for t in s.sample(logits.clone(), rids, [params] * 6, [[]] * 6, [[]] * 6)]
        finally:
            sampling.CANDIDATES = old

    assert draws(1024) == draws(49152)


def _filter_whole(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filters as a sort of each whole row computes them (the definition)."""
    vocab = scaled.shape[-1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    ranks = torch.arange(vocab)[None, :]
    drop = ranks >= (params.top_k if params.top_k > 0 else vocab)
    drop = drop | ((probs.cumsum(dim=-1) - probs) > params.top_p)
    drop = drop | (probs < params.min_p * probs[:, :1])
    drop[:, 0] = False
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
