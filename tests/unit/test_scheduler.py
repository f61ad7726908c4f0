"""Continuous batching decisions, without torch: admission by KV blocks, chunked prefill, batch order, and when
block tables are made, grown, matched against the prefix cache and freed."""

from __future__ import annotations

from tokenwire.engine.interface import SamplingParams
from tokenwire.engine.scheduler import Scheduler, SchedulerConfig
from tokenwire.engine.sequence import SeqState, Sequence


def seq(rid: str, prompt_len: int = 4, max_new: int = 8) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), max_new, SamplingParams(max_tokens=max_new))


def rows_are_consistent(s: Scheduler) -> None:
    for i, q in enumerate(s.running):
        assert q.row == i
    assert all(q.state is SeqState.DECODE for q in s.running[: s.num_decode])
    assert all(q.state is SeqState.PREFILL for q in s.running[s.num_decode :])


def test_new_request_joins_the_running_batch_at_the_next_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4))
    a = seq("a")
    s.add(a)
    out = s.schedule()
    assert [c.seq for c in out.prefill] == [a] and out.num_decode == 0
    s.promote(a)
    b = seq("b")
    s.add(b)
    out = s.schedule()
    assert out.num_decode == 1 and [c.seq for c in out.prefill] == [b]
    rows_are_consistent(s)


def test_batch_size_limit_keeps_the_rest_waiting() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2))
    seqs = [seq(str(i)) for i in range(3)]
    for q in seqs:
        s.add(q)
    s.schedule()
    assert len(s.running) == 2 and list(s.waiting) == [seqs[2]]


def test_long_prompt_is_prefilled_in_chunks() -> None:
    s = Scheduler(SchedulerConfig(max_prefill_tokens=100))
    a = seq("a", prompt_len=250)
    s.add(a)
    spans = []
    for _ in range(3):
        chunk = s.schedule().prefill[0]
        spans.append((chunk.start, chunk.end, chunk.is_last))
        a.num_computed = chunk.end
    assert spans == [(0, 100, False), (100, 200, False), (200, 250, True)]


def test_kv_budget_limits_admission() -> None:
    s = Scheduler(SchedulerConfig(kv_cache_tokens=100))  # 4 blocks of 32
    s.add(seq("a", prompt_len=30, max_new=10))  # reserves 40 positions: 2 blocks
    s.add(seq("b", prompt_len=30, max_new=10))  # 2 + 2 = 4 blocks fit
    s.add(seq("c", prompt_len=30, max_new=10))  # 6 do not
    s.schedule()
    assert [q.request_id for q in s.running] == ["a", "b"] and len(s.waiting) == 1


def test_admission_counts_blocks_so_one_long_request_does_not_make_every_row_long() -> None:
    """The budget is what each sequence may hold, not rows x the longest reservation."""
    s = Scheduler(SchedulerConfig(kv_cache_tokens=320))  # 10 blocks
    s.add(seq("long", prompt_len=100, max_new=156))  # 8 blocks
    for i in range(3):
        s.add(seq(f"short{i}", prompt_len=10, max_new=20))  # 1 block each
    s.schedule()
    assert [q.request_id for q in s.running] == ["long", "short0", "short1"]  # rows x longest: "long" alone


def test_a_request_larger_than_the_budget_still_runs_alone() -> None:
    """The pool holds at least one whole context, so the one request that needs more than the budget gets every
    block it reserved."""
    s = Scheduler(SchedulerConfig(kv_cache_tokens=10, max_context=64))
    assert s.blocks.num_blocks == 2
    big = seq("big", prompt_len=30, max_new=30)
    s.add(big)
    s.add(seq("small", prompt_len=2, max_new=2))
    s.schedule()
    assert s.running == [big] and len(s.waiting) == 1
    big.num_computed = 30
    s.promote(big)
    big.output_ids = [1] * 29  # its last position, 58, gets a block
    s.schedule()
    assert len(s.blocks.table("big").block_ids) == 2 and len(s.waiting) == 1


def test_blocks_are_taken_as_chunks_and_tokens_arrive_and_freed_when_the_sequence_ends() -> None:
    s = Scheduler(SchedulerConfig(max_prefill_tokens=40, prefix_caching=False))
    a = seq("a", prompt_len=70, max_new=100)
    s.add(a)
    assert "a" not in s.blocks  # admitted, not matched yet: no blocks
    chunk = s.schedule().prefill[0]
    assert (chunk.start, chunk.end) == (0, 40) and len(s.blocks.table("a").block_ids) == 2
    a.num_computed = 40
    chunk = s.schedule().prefill[0]
    assert (chunk.start, chunk.end) == (40, 70) and len(s.blocks.table("a").block_ids) == 3
    a.num_computed = 70
    s.promote(a)
    a.output_ids = [1] * 26  # the position of the last one, 95, is fed next: still the third block
    s.schedule()
    assert len(s.blocks.table("a").block_ids) == 3
    a.output_ids.append(1)  # position 96 starts a fourth block
    s.schedule()
    assert len(s.blocks.table("a").block_ids) == 4 and s.blocks.num_used_blocks == 4
    s.remove(a)
    assert "a" not in s.blocks and s.blocks.num_used_blocks == 0


def test_a_shared_prefix_is_matched_at_the_first_chunk_so_requests_arriving_together_share_it() -> None:
    """Both are admitted in one step; the second is matched only when its first chunk is scheduled, after the
    first one computed (and committed) the shared blocks: it prefills its suffix only."""
    s = Scheduler(SchedulerConfig(max_prefill_tokens=70))
    system = list(range(1000, 1064))  # 2 blocks
    a = Sequence("a", [*system, *range(6)], 8)
    b = Sequence("b", [*system, *range(10, 16)], 8)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert out.admitted == [a, b] and out.matched == [a] and [c.seq for c in out.prefill] == [a]
    a.num_computed = 70
    s.blocks.commit("a", a.prompt_ids, 70)  # what the engine does once the forward pass ran
    s.promote(a)
    out = s.schedule()
    assert out.matched == [b] and b.cached_tokens == 64
    assert [(c.seq, c.start, c.end) for c in out.prefill] == [(b, 64, 70)]
    assert s.blocks.table("b").block_ids[:2] == s.blocks.table("a").block_ids[:2]


def test_with_prefix_caching_off_every_prompt_is_computed_whole() -> None:
    s = Scheduler(SchedulerConfig(prefix_caching=False))
    prompt = list(range(100))
    a = Sequence("a", prompt, 8)
    s.add(a)
    s.schedule()
    a.num_computed = 100
    s.blocks.commit("a", prompt, 100)
    s.remove(a)
    b = Sequence("b", prompt, 8)
    s.add(b)
    out = s.schedule()
    assert b.cached_tokens == 0 and (out.prefill[0].start, out.prefill[0].end) == (0, 100)


def test_blocks_held_outside_the_batch_give_way_only_when_that_makes_room() -> None:
    """A paused request's kept table is freed (by the owner's make_room) when a request being admitted needs its
    blocks, and only if freeing what is held outside the batch would be enough."""
    asked: list[int] = []

    def make_room(need: int) -> None:
        asked.append(need)
        if "kept" in s.blocks:
            s.blocks.free("kept")

    s = Scheduler(SchedulerConfig(kv_cache_tokens=128, prefix_caching=False), make_room)  # 4 blocks
    s.blocks.allocate("kept", list(range(10)))  # 1 block held outside the batch
    a = seq("a", prompt_len=4, max_new=60)  # reserves 2 blocks
    s.add(a)
    s.schedule()
    assert asked == [] and len(s.blocks.table("a").block_ids) == 1  # 2 available
    s.add(seq("c", prompt_len=4, max_new=80))  # 3 blocks: 1 + 3 > 3 even without "kept"
    s.schedule()
    assert asked == [] and "kept" in s.blocks and len(s.waiting) == 1
    s.remove(s.waiting[0])
    s.add(seq("d", prompt_len=4, max_new=60))  # 2 blocks: 1 + 2 > 2, but fits once "kept" is freed
    s.schedule()
    assert asked == [3] and "kept" not in s.blocks and [q.request_id for q in s.running] == ["a", "d"]


def test_a_queued_request_gives_up_the_table_it_brought_for_the_head_of_the_queue() -> None:
    s = Scheduler(SchedulerConfig(kv_cache_tokens=128, prefix_caching=False))  # 4 blocks
    head = seq("head", prompt_len=4, max_new=124)  # all 4 blocks
    behind = seq("behind", prompt_len=40)
    s.blocks.allocate("behind", behind.prompt_ids, 33)  # a continued request's kept KV: 2 blocks
    behind.num_computed = 33
    s.add(head)
    s.add(behind)
    s.schedule()
    assert s.running == [head] and "behind" not in s.blocks and behind.num_computed == 0


def test_removing_a_decoding_row_keeps_rows_compact_and_decoders_first() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8))
    seqs = [seq(str(i)) for i in range(5)]
    for q in seqs:
        s.add(q)
    s.schedule()
    for q in seqs[:3]:
        s.promote(q)
    rows_are_consistent(s)
    s.remove(seqs[0])
    rows_are_consistent(s)
    assert s.num_decode == 2 and len(s.running) == 4
    s.remove(seqs[4])  # a prefilling one
    rows_are_consistent(s)
    assert seqs[0].state is SeqState.FINISHED and s.get("0") is None


def test_waiting_request_can_be_removed() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=1))
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.remove(b)
    assert not s.waiting and s.get("b") is None
