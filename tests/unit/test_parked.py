"""The store of paused requests' kept KV: which tokens their blocks hold, oldest given back first, exact prefix
matches only, and their blocks released when an entry is dropped but not when it is taken back."""

from __future__ import annotations

from tokenwire.engine.hf.parked import ParkedKV, ParkedStore


def entry(tokens: list[int]) -> ParkedKV:
    return ParkedKV(tokens)


def test_kept_kv_fits_only_a_prompt_it_is_a_strict_prefix_of() -> None:
    kept = entry([1, 2, 3])
    assert kept.fits([1, 2, 3, 4]) and kept.fits([1, 2, 3, 4, 5])
    assert not kept.fits([1, 2, 3])  # nothing left to compute: no logits to sample from
    assert not kept.fits([1, 2, 9, 4])  # another sequence
    assert not entry([]).fits([1, 2])


def test_the_oldest_entry_gives_way_first_and_its_blocks_are_released() -> None:
    released: list[str] = []
    store = ParkedStore(released.append)
    store.put("a", entry([1] * 10))
    store.put("b", entry([2] * 20))
    store.put("c", entry([3] * 30))
    assert store.tokens == 60 and len(store) == 3
    assert store.drop_oldest() == "a" and released == ["a"] and "a" not in store and store.tokens == 50
    assert store.drop_oldest() == "b" and store.drop_oldest() == "c"
    assert store.drop_oldest() is None
    assert released == ["a", "b", "c"] and store.tokens == 0 and store.evicted == 3


def test_take_keeps_the_blocks_drop_releases_them_and_a_second_put_replaces() -> None:
    released: list[str] = []
    store = ParkedStore(released.append)
    store.put("a", entry([1] * 10))
    store.put("a", entry([1] * 12))  # the same request's blocks, further on
    assert store.tokens == 12 and len(store) == 1 and released == []
    taken = store.take("a")
    assert taken is not None and taken.tokens == 12 and store.tokens == 0
    assert store.take("a") is None and released == []  # taken back to be used: not released
    store.put("b", entry([1] * 5))
    store.drop("b")
    store.drop("never")
    assert released == ["b"] and store.tokens == 0 and len(store) == 0 and store.evicted == 0
