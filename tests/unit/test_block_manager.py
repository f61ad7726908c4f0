"""The block manager alone: allocation, growth, freeing, the chained-hash prefix cache and its LRU eviction."""

from __future__ import annotations

import pytest

from tokenwire.engine import block_manager as bm
from tokenwire.engine.block_manager import BlockManager, OutOfBlocks, chain_hash

B = 4


def run_to_end(m: BlockManager, seq_id: str, tokens: list[int]) -> int:
    """Allocate, compute every position (as prefill + decode would), commit, free; returns the cached tokens."""
    cached = m.allocate(seq_id, tokens)
    m.commit(seq_id, tokens, len(tokens))
    m.free(seq_id)
    return cached


# -- construction and validation
@pytest.mark.parametrize(("blocks", "size"), [(0, 4), (4, 0), (-1, 4)])
def test_sizes_below_one_are_refused(blocks: int, size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(blocks, size)


def test_bad_arguments_are_value_errors() -> None:
    m = BlockManager(8, B)
    with pytest.raises(ValueError):
        m.allocate("a", [])
    with pytest.raises(ValueError):
        m.allocate("a", [1, 2, 3], num_tokens=4)
    with pytest.raises(ValueError):
        m.can_allocate([1, 2], reserve_blocks=-1)
    with pytest.raises(ValueError):
        m.blocks_for(-1)
    m.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError):
        m.allocate("a", [1, 2, 3])  # already has blocks
    for call in (lambda: m.free("nope"), lambda: m.ensure("nope", 1), lambda: m.table("nope")):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        m.ensure("a", -1)
    with pytest.raises(ValueError):
        m.slots("a", 0, 4)  # only 3 positions have a slot
    with pytest.raises(ValueError):
        m.slots("a", 2, 1)
    with pytest.raises(ValueError):
        m.commit("a", [1, 2, 3], 4)  # more than the tokens and the table


# -- allocation and growth
def test_blocks_follow_the_tokens_held_and_come_back_when_freed() -> None:
    m = BlockManager(8, B, prefix_caching=False)
    assert m.allocate("a", list(range(6))) == 0
    assert len(m.table("a").block_ids) == 2 and m.num_used_blocks == 2
    m.ensure("a", 8)  # positions 6, 7: the second block has room
    assert len(m.table("a").block_ids) == 2
    m.ensure("a", 9)  # position 8 starts a third block
    assert len(m.table("a").block_ids) == 3 and m.num_free_blocks == 5
    m.ensure("a", 5)  # never shrinks
    assert m.table("a").num_tokens == 9
    m.free("a")
    assert m.num_free_blocks == 8 and m.num_used_blocks == 0 and "a" not in m


def test_allocating_part_of_a_prompt_leaves_the_rest_for_later_chunks() -> None:
    m = BlockManager(8, B)
    m.allocate("a", list(range(20)), num_tokens=5)
    assert m.table("a").num_tokens == 5 and len(m.table("a").block_ids) == 2
    m.ensure("a", 20)
    assert len(m.table("a").block_ids) == 5


def test_slots_map_positions_through_the_block_table() -> None:
    m = BlockManager(8, B)
    m.allocate("x", [9])  # takes block 0
    m.allocate("a", list(range(10)))  # blocks 1, 2, 3
    assert m.table("a").block_ids == [1, 2, 3]
    assert m.slots("a", 0, 10) == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    m.free("x")
    m.allocate("b", [1, 2, 3, 4, 5])  # the lowest free ids first: 0, then 4
    assert m.table("b").block_ids == [0, 4]
    assert m.slots("b", 3, 5) == [3, 16]


def test_running_out_raises_and_changes_nothing() -> None:
    m = BlockManager(3, B, prefix_caching=False)
    m.allocate("a", list(range(8)))
    assert not m.can_allocate(list(range(5)))
    with pytest.raises(OutOfBlocks):
        m.allocate("b", list(range(5)))
    assert "b" not in m and m.num_free_blocks == 1
    assert m.can_ensure("a", 12) and not m.can_ensure("a", 13)
    with pytest.raises(OutOfBlocks):
        m.ensure("a", 13)
    assert m.table("a").num_tokens == 8 and len(m.table("a").block_ids) == 2


def test_reserve_keeps_headroom_for_running_sequences() -> None:
    m = BlockManager(4, B)
    m.allocate("a", list(range(4)))
    assert m.can_allocate(list(range(8)), reserve_blocks=1)
    assert not m.can_allocate(list(range(8)), reserve_blocks=2)


# -- prefix cache
def test_a_finished_sequences_full_blocks_are_reused_never_the_last_token() -> None:
    m = BlockManager(16, B)
    system = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert run_to_end(m, "turn1", [*system, 1, 2]) == 0
    assert m.num_cached_blocks == 3  # 12 tokens computed = 3 full blocks; nothing partial is kept
    assert m.match([*system, 7, 7, 7]) == 8  # the shared 2 blocks; block 3 differs
    assert m.match([*system, 1, 2]) == 8  # exactly 3 blocks: the last token must be computed, so 2 blocks
    assert m.match([*system, 1, 2, 5]) == 12
    cached = m.allocate("turn2", [*system, 1, 2, 5, 6])
    assert cached == 12 and m.table("turn2").cached_tokens == 12
    assert m.num_cached_blocks == 0  # taken out of the cache while referenced
    assert m.hit_tokens == 12 and m.queried_tokens == 12 + 14


def test_a_chats_next_turn_reuses_prompt_and_answer() -> None:
    m = BlockManager(32, B)
    turn1 = list(range(1, 11))
    answer = [50, 51, 52, 53, 54, 55]
    seq = turn1 + answer
    m.allocate("t1", turn1)
    m.commit("t1", turn1, len(turn1))  # after prefill: 2 full blocks
    m.ensure("t1", len(seq))
    m.commit("t1", seq, len(seq) - 1)  # the last sampled token is never fed: 15 computed -> 3 full blocks
    m.free("t1")
    turn2 = [*seq, 60, 61, 62]
    assert m.allocate("t2", turn2) == 12


def test_live_sequences_share_a_system_prompt_read_only() -> None:
    m = BlockManager(16, B)
    system = list(range(100, 108))  # 2 full blocks
    m.allocate("first", [*system, 1, 2, 3])
    m.commit("first", [*system, 1, 2, 3], 11)
    assert m.allocate("second", [*system, 4, 5]) == 8
    shared = m.table("first").block_ids[:2]
    assert m.table("second").block_ids[:2] == shared
    assert all(m.blocks[i].ref_count == 2 for i in shared)
    # what "second" writes (positions >= its cached tokens) is in blocks it owns alone
    written = {s // B for s in m.slots("second", 8, 10)}
    assert written.isdisjoint(shared) and all(m.blocks[i].ref_count == 1 for i in written)
    m.free("first")
    assert all(m.blocks[i].ref_count == 1 for i in shared) and m.num_cached_blocks == 0
    m.free("second")
    assert m.num_cached_blocks == 2  # "first"'s third block was partial: freed, not cached


def test_uncomputed_blocks_are_not_shared() -> None:
    m = BlockManager(16, B)
    prompt = list(range(12))
    m.allocate("a", prompt)  # slots given, nothing computed yet
    assert m.match([*prompt, 1]) == 0
    m.commit("a", prompt, 5)  # the first chunk ran: one full block
    assert m.match([*prompt, 1]) == 4


def test_duplicate_content_is_registered_once() -> None:
    m = BlockManager(16, B)
    p = list(range(9))
    m.allocate("a", p)
    m.allocate("b", p)  # admitted before "a" computed anything: no hit, its own blocks
    m.commit("a", p, 9)
    m.commit("b", p, 9)
    a_blocks, b_blocks = m.table("a").block_ids, m.table("b").block_ids
    assert set(a_blocks).isdisjoint(b_blocks)
    assert all(m.blocks[i].hash is None for i in b_blocks)  # duplicates stay unregistered
    m.free("b")
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 16 - 3
    m.free("a")
    assert m.num_cached_blocks == 2
    assert m.allocate("c", [*p, 1]) == 8 and m.table("c").block_ids[:2] == a_blocks[:2]


def test_the_hash_is_chained_over_the_blocks_before() -> None:
    m = BlockManager(16, B)
    run_to_end(m, "a", [1, 1, 1, 1, 2, 2, 2, 2, 0])
    assert m.match([3, 3, 3, 3, 2, 2, 2, 2, 0]) == 0  # the same second block after another first block
    assert m.match([1, 1, 1, 1, 2, 2, 2, 2, 0]) == 8
    assert chain_hash(None, [2, 2, 2, 2]) != chain_hash(chain_hash(None, [1, 1, 1, 1]), [2, 2, 2, 2])


def test_a_hash_collision_costs_a_miss_not_wrong_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm, "chain_hash", lambda parent, tokens: 42)
    m = BlockManager(16, B)
    run_to_end(m, "a", [1, 2, 3, 4, 5])
    assert m.match([1, 2, 3, 4, 5]) == 4
    assert m.match([9, 9, 9, 9, 5]) == 0  # same key, other tokens


def test_cached_blocks_give_way_least_recently_used_first() -> None:
    m = BlockManager(6, B)
    old = [1] * 8 + [0]
    new = [2] * 8 + [0]
    run_to_end(m, "old", old)  # 2 cached blocks
    run_to_end(m, "new", new)  # 2 more (4 cached, 2 free)
    assert m.num_cached_blocks == 4 and m.num_available_blocks == 6
    assert m.allocate("touch", [*old[:8], 5]) == 8  # "old" is used again: now the most recent
    m.free("touch")
    m.allocate("big", list(range(100, 116)))  # 4 blocks: the 2 free ones, then 2 evicted
    assert m.evicted_blocks == 2
    assert m.match(old) == 8  # kept: used most recently
    assert m.match(new) == 0  # evicted: least recently used
    # a sequence's tail is evicted before its head (a chain is only found from its start)
    m.free("big")
    m.clear_cache()
    run_to_end(m, "chain", [7] * 12 + [0])
    m.allocate("one", list(range(100, 116)))  # 4 blocks: 3 free, then 1 evicted
    assert m.match([7] * 12 + [0]) == 8


def test_cached_hits_count_against_the_room_they_take() -> None:
    m = BlockManager(4, B)
    run_to_end(m, "a", [1] * 8 + [0])  # 2 cached, 2 free
    prompt = [1] * 8 + list(range(8))  # 2 hits (cached, so taking them uses room) + 2 fresh = 4
    assert m.can_allocate(prompt)
    assert not m.can_allocate(prompt, reserve_blocks=1)
    assert m.allocate("b", prompt) == 8 and m.num_available_blocks == 0


def test_prefix_caching_off_keeps_nothing() -> None:
    m = BlockManager(8, B, prefix_caching=False)
    p = list(range(9))
    assert run_to_end(m, "a", p) == 0
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 8
    assert m.match([*p, 1]) == 0 and m.allocate("b", [*p, 1]) == 0
    assert m.queried_tokens == 0


def test_high_water_tracks_referenced_and_cached_blocks() -> None:
    m = BlockManager(8, B)
    assert m.high_water() == 0
    m.allocate("a", list(range(9)))  # blocks 0..2
    m.commit("a", list(range(9)), 9)
    m.free("a")  # 0, 1 cached, 2 free
    assert m.high_water() == 2
    m.clear_cache()
    assert m.high_water() == 0
