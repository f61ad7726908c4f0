"""The store of paused requests' KV: bounded by tokens, oldest dropped first, exact prefix matches only."""

from __future__ import annotations

import torch

from tokenwire.engine.hf.parked import ParkedKV, ParkedStore


def entry(tokens: list[int]) -> ParkedKV:
    n = len(tokens)
    return ParkedKV(tokens, [torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)])


def test_kept_kv_fits_only_a_prompt_it_is_a_strict_prefix_of() -> None:
    kept = entry([1, 2, 3])
    assert kept.fits([1, 2, 3, 4]) and kept.fits([1, 2, 3, 4, 5])
    assert not kept.fits([1, 2, 3])  # nothing left to compute: no logits to sample from
    assert not kept.fits([1, 2, 9, 4])  # another sequence
    assert not entry([]).fits([1, 2])


def test_the_store_counts_tokens_and_drops_the_oldest_first() -> None:
    store = ParkedStore()
    store.put("a", entry([1] * 10))
    store.put("b", entry([2] * 20))
    store.put("c", entry([3] * 30))
    assert store.tokens == 60 and len(store) == 3
    assert store.shrink(55) == 1 and "a" not in store and store.tokens == 50
    assert store.shrink(50) == 0
    assert store.shrink(0) == 2 and store.tokens == 0 and store.evicted == 3


def test_take_and_drop_give_the_tokens_back_and_a_second_put_replaces() -> None:
    store = ParkedStore()
    store.put("a", entry([1] * 10))
    store.put("a", entry([1] * 12))
    assert store.tokens == 12 and len(store) == 1
    taken = store.take("a")
    assert taken is not None and taken.tokens == 12 and store.tokens == 0
    assert store.take("a") is None
    store.put("b", entry([1] * 5))
    store.drop("b")
    store.drop("never")
    assert store.tokens == 0 and len(store) == 0
