"""Journals and the resume registry, without sockets: a fake clock drives the window and the budget."""

from __future__ import annotations

import asyncio

import pytest

from tokenwire.server.admission.auth import owner_of
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.resume.journal import Journal, Registry
from tokenwire.server.resume.log import Entry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def journal(session: str = "s1", gen_id: str = "g", owner: str | None = None, entries: int = 0) -> Journal:
    j = Journal(session, gen_id, owner, f"{session}:{gen_id}")
    for i in range(entries):
        j.append(Entry(f'{{"seq":{i}}}', tokens=1))
    return j


def test_entries_are_numbered_from_zero_and_nothing_follows_the_final_one() -> None:
    j = journal()
    assert j.last_seq == -1
    assert j.append(Entry("a")) == 0
    assert j.append(Entry("b", tokens=2)) == 1
    assert j.append(Entry("end", final=True)) == 2
    assert j.finished and j.nbytes == len("a") + len("b") + len("end")
    with pytest.raises(RuntimeError):
        j.append(Entry("late"))


async def test_a_reader_waiting_for_more_wakes_on_append_and_on_close() -> None:
    j = journal(entries=1)
    waiter = asyncio.create_task(j.wait_beyond(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    j.append(Entry("next"))
    await asyncio.wait_for(waiter, 1)
    waiter = asyncio.create_task(j.wait_beyond(1))
    await asyncio.sleep(0)
    j.close()  # aborted: no final entry, but the reader must not wait forever
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(j.wait_beyond(5), 1)  # a finished journal never blocks


def test_find_matches_owner_and_session_and_asks_for_the_session_when_ambiguous() -> None:
    reg = Registry(window=60)
    a, b = journal("s1", "g"), journal("s2", "g")
    keyed = journal("s3", "k", owner=owner_of("key"))
    for j in (a, b, keyed):
        reg.add(j)
    assert reg.find(None, "g", "s2") is b
    with pytest.raises(RequestError) as info:
        reg.find(None, "g", None)
    assert info.value.param == "session"
    reg.forget(a)
    assert reg.find(None, "g", None) is b
    assert reg.find(owner_of("key"), "k", None) is keyed
    for owner, session in ((None, None), (owner_of("other"), "s3"), (None, "s3")):
        with pytest.raises(RequestError) as info:
            reg.find(owner, "k", session)
        assert info.value.param == "id"
    with pytest.raises(RequestError):
        reg.find(None, "g", "s1")  # forgotten


def test_owner_is_a_digest_not_the_key() -> None:
    assert owner_of(None) is None
    digest = owner_of("secret-key")
    assert digest is not None and "secret" not in digest and digest == owner_of("secret-key")


def test_a_running_generation_cannot_be_replaced_but_a_finished_one_can() -> None:
    reg = Registry(window=60)
    first = journal()
    reg.add(first)
    with pytest.raises(KeyError):
        reg.add(journal())
    first.append(Entry("end", final=True))
    reg.finished(first)
    second = journal()
    reg.add(second)
    assert reg.find(None, "g", "s1") is second


def test_an_orphan_runs_for_the_window_then_is_handed_back_to_be_aborted() -> None:
    clock = Clock()
    reg = Registry(window=10, clock=clock)
    held, orphan = journal("s1", "held"), journal("s1", "orphan")
    for j in (held, orphan):
        reg.add(j)
        reg.attach(j, holder=object())
    assert reg.detach(orphan) is False  # not aborted now: it may be resumed
    assert reg.orphaned == 1
    clock.now += 9.9
    assert reg.sweep() == [] and len(reg) == 2
    clock.now += 0.2
    assert reg.sweep() == [orphan]
    assert len(reg) == 1 and reg.orphaned == 0
    clock.now += 1000
    assert reg.sweep() == []  # a held, running generation never expires
    assert reg.find(None, "held", "s1") is held


def test_a_resumed_orphan_stops_its_clock_and_a_finished_one_is_kept_for_the_window() -> None:
    clock = Clock()
    reg = Registry(window=10, clock=clock)
    j = journal(entries=2)
    reg.add(j)
    reg.detach(j)
    clock.now += 8
    reg.attach(j, holder=object())  # resumed in time
    clock.now += 8
    assert reg.sweep() == [] and len(reg) == 1
    j.append(Entry("end", final=True))
    reg.finished(j)
    clock.now += 9
    assert reg.sweep() == [] and len(reg) == 1  # a late client can still fetch the end
    clock.now += 2
    assert reg.sweep() == [] and len(reg) == 0  # forgotten; nothing to abort


def test_over_budget_the_longest_idle_go_first_and_held_running_ones_stay() -> None:
    clock = Clock()
    reg = Registry(window=60, budget_bytes=50, clock=clock)
    held = journal("s", "held", entries=4)  # 4 x 9 bytes
    reg.add(held)
    reg.attach(held, holder=object())
    idle = []
    for name in ("old", "mid", "new"):
        j = journal("s", name, entries=1)
        reg.add(j)
        reg.detach(j)
        idle.append(j)
        clock.now += 1
    assert reg.nbytes == 7 * 9
    gone = reg.sweep()
    assert gone == [idle[0], idle[1]]  # running orphans, oldest first, until under budget
    assert reg.nbytes <= 50
    assert reg.find(None, "new", "s") is idle[2] and reg.find(None, "held", "s") is held


def test_a_zero_window_keeps_nothing() -> None:
    reg = Registry(window=0)
    j = journal()
    reg.add(j)
    reg.attach(j, holder=object())
    assert reg.detach(j) is True  # abort it now
    assert len(reg) == 0
    done = journal("s", "done")
    reg.add(done)
    done.append(Entry("end", final=True))
    reg.finished(done)
    assert len(reg) == 0
    with pytest.raises(RequestError) as info:
        reg.find(None, "g", None)
    assert "resume is off" in info.value.message
