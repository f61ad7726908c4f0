"""The prefix-cache index counts reused prompt tokens as a paged cache finds them: whole blocks, chained."""

from __future__ import annotations

from tokenwire.engine.prefix import PrefixIndex


def test_only_whole_leading_blocks_count_and_never_the_last_prompt_token() -> None:
    index = PrefixIndex(block_tokens=4, capacity_blocks=100)
    seq = list(range(10))  # blocks [0-3] [4-7], and 2 tokens in a partial block
    index.insert(seq)
    assert len(index) == 2
    assert index.match([*seq, 99]) == 8
    assert index.match(seq[:9]) == 8
    assert index.match(seq[:8]) == 4  # 8 tokens: the last one is computed again, so only the first block counts
    assert index.match([*seq[:6], 50, 51, 52]) == 4  # the second block differs
    assert index.match([]) == 0


def test_blocks_are_chained_on_everything_before_them() -> None:
    index = PrefixIndex(block_tokens=2, capacity_blocks=100)
    index.insert([1, 2, 3, 4])
    assert index.match([9, 9, 3, 4, 5]) == 0  # the same second block after another first one is another block
    assert index.match([1, 2, 3, 4, 5]) == 4


def test_least_recently_used_blocks_go_first() -> None:
    index = PrefixIndex(block_tokens=2, capacity_blocks=3)
    index.insert([1, 1, 2, 2])  # 2 blocks
    index.insert([5, 5, 6, 6])  # 2 more: the oldest, [1, 1], goes
    assert len(index) == 3
    assert index.match([1, 1, 2, 2, 0]) == 0
    assert index.match([5, 5, 6, 6, 0]) == 4
