"""The Responses store and event log: bounded, expiring, numbered; pure (a fake clock, no server)."""

from __future__ import annotations

import asyncio
import json

from tokenwire.engine.interface import ChatMessage, SamplingParams
from tokenwire.server.responses.protocol import CreateRequest
from tokenwire.server.responses.service import read_events
from tokenwire.server.responses.store import Record, ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(rid: str, text: str = "", stream_id: str | None = None) -> Record:
    req = CreateRequest(input=(ChatMessage("user", "hi"),), params=SamplingParams(), model="m", stream_id=stream_id)
    r = Record(rid, req, history=(ChatMessage("system", "s"),))
    r.parts.append(text)
    return r


def finish(r: Record, clock: Clock) -> None:
    r.status = "completed"
    r.emit("response.completed", response={})
    r.ended(clock)


def test_a_finished_response_expires_after_the_ttl_and_a_running_one_never() -> None:
    clock = Clock()
    store = ResponseStore(max_responses=10, ttl=60, clock=clock)
    done, running = record("a"), record("b")
    store.add(done)
    store.add(running)
    finish(done, clock)
    clock.now = 59
    assert store.get("a") is done
    clock.now = 61
    assert store.get("a") is None and store.get("b") is running
    clock.now = 10_000
    store.sweep()
    assert len(store) == 1


def test_past_its_bound_the_store_drops_the_oldest_finished_first() -> None:
    clock = Clock()
    store = ResponseStore(max_responses=2, ttl=60, clock=clock)
    old, running, newer = record("old"), record("run"), record("new")
    for r in (old, running):
        store.add(r)
    finish(old, clock)
    store.add(newer)
    assert store.get("old") is None and store.get("run") is running and store.get("new") is newer
    store.add(record("more"))  # nothing finished to drop: running responses are never dropped
    assert len(store) == 3


def test_a_continuation_starts_from_the_history_the_input_and_the_answer() -> None:
    r = record("a", text="Hello!")
    assert r.conversation == (ChatMessage("system", "s"), ChatMessage("user", "hi"), ChatMessage("assistant", "Hello!"))
    r.status = "failed"
    assert r.conversation[-1] == ChatMessage("user", "hi")  # a failed answer is not part of the conversation


async def test_events_are_numbered_by_their_place_and_read_from_any_number() -> None:
    r = record("a", stream_id="lane")
    r.emit("response.created", response={})
    r.emit("response.output_text.delta", tokens=1, delta="x")

    async def read(after: int) -> list[dict[str, object]]:
        return [json.loads(d) async for d in read_events(r, after)]

    reader = asyncio.create_task(read(0))
    await asyncio.sleep(0)
    finish(r, Clock())
    got = await asyncio.wait_for(reader, 5)
    assert [(e["sequence_number"], e["type"]) for e in got] == [
        (1, "response.output_text.delta"),
        (2, "response.completed"),
    ]
    assert all(e["stream_id"] == "lane" for e in got)
    assert Record.event_type(r.log.entries[0].data) == "response.created"
    assert [e["sequence_number"] for e in await read(-1)] == [0, 1, 2]


def test_event_logs_stay_under_the_budget_foreground_ones_let_go_first_results_kept() -> None:
    clock = Clock()

    def filled(rid: str, background: bool = False) -> Record:
        r = record(rid)
        if background:
            r.request = CreateRequest(input=(), params=SamplingParams(), model="m", background=True)
        for _ in range(10):
            r.emit("response.output_text.delta", delta="x" * 80)
        finish(r, clock)
        return r

    one = filled("probe").log.nbytes
    store = ResponseStore(max_responses=100, ttl=600, clock=clock, budget_bytes=int(2.5 * one))
    fore, back, read = filled("fore"), filled("back", background=True), filled("read")
    read.readers = 1  # a stream still reads it
    for r in (fore, back, read):
        store.add(r)
    assert fore.log.dropped and not back.log.dropped and not read.log.dropped
    assert store.nbytes <= store.budget_bytes
    assert store.get("fore") is fore and fore.status == "completed"  # the result stays
    store.budget_bytes = int(1.5 * one)
    store.trim()
    assert back.log.dropped and not read.log.dropped  # background logs go last; one being read never
