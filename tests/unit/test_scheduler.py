"""Continuous batching decisions, without torch: admission, chunked prefill, KV rows and their swaps."""

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
    s = Scheduler(SchedulerConfig(kv_cache_tokens=100))
    s.add(seq("a", prompt_len=30, max_new=10))  # reserves 40
    s.add(seq("b", prompt_len=30, max_new=10))  # 2 x 40 = 80 fits
    s.add(seq("c", prompt_len=30, max_new=10))  # 3 x 40 = 120 does not
    s.schedule()
    assert [q.request_id for q in s.running] == ["a", "b"] and len(s.waiting) == 1


def test_a_request_larger_than_the_budget_still_runs_alone() -> None:
    s = Scheduler(SchedulerConfig(kv_cache_tokens=10))
    s.add(seq("big", prompt_len=30))
    s.schedule()
    assert len(s.running) == 1


def test_removing_a_decoding_row_keeps_rows_compact_and_decoders_first() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8))
    seqs = [seq(str(i)) for i in range(5)]
    for q in seqs:
        s.add(q)
    s.schedule()
    for q in seqs[:3]:
        s.promote(q)
    rows_are_consistent(s)
    swaps = s.remove(seqs[0])
    assert swaps  # rows moved in the cache
    rows_are_consistent(s)
    assert s.num_decode == 2 and len(s.running) == 4
    s.remove(seqs[4])  # a prefilling one
    rows_are_consistent(s)
    assert seqs[0].state is SeqState.FINISHED and s.get("0") is None


def test_swaps_replayed_on_a_list_give_the_same_rows() -> None:
    """The runner applies the swaps to KV rows; replaying them must track each sequence's row."""
    s = Scheduler(SchedulerConfig(max_batch_size=8))
    seqs = [seq(str(i)) for i in range(6)]
    for q in seqs:
        s.add(q)
    s.schedule()
    rows: list[str | None] = [q.request_id for q in s.running] + [None, None]
    swaps = []
    for q in (seqs[2], seqs[0], seqs[5]):
        swaps += s.promote(q)
    swaps += s.remove(seqs[2])
    swaps += s.remove(seqs[3])
    for i, j in swaps:
        rows[i], rows[j] = rows[j], rows[i]
    assert rows[: len(s.running)] == [q.request_id for q in s.running]


def test_waiting_request_can_be_removed() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=1))
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.remove(b) == [] and not s.waiting
