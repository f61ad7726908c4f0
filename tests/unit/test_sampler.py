"""The row sampler: each row its own distribution and generator; a row that cannot be sampled fails alone."""

from __future__ import annotations

import math

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
