"""What a generation's messages go through (append, read from a seq, wait for more, finish, expire: journal.py's
MessageLog): the in-memory journal and the Redis one pass the same tests. With Redis, the writer and the reader
are two replicas: one copies its journal out, the other follows it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import scaled, wait_until
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.resume.journal import Journal, Registry
from tokenwire.server.resume.log import Entry
from tokenwire.server.resume.record import Record
from tokenwire.server.resume.redis_journal import RedisJournal

WINDOW = 0.6


class MemorySide:
    """One process: the reader finds the writer's journal in the registry."""

    def __init__(self) -> None:
        self.registry = Registry(window=WINDOW)

    async def start(self, session: str, gen_id: str) -> Journal:
        journal = Journal(session, gen_id, None, f"{session}:{gen_id}")
        self.registry.add(journal)
        return journal

    async def reader(self, gen_id: str) -> Journal:
        return self.registry.find(None, gen_id, None)

    async def ended(self, journal: Journal) -> None:
        self.registry.finished(journal)

    async def lookup(self, gen_id: str) -> None:
        self.registry.sweep()
        self.registry.find(None, gen_id, None)

    async def close(self) -> None:
        pass


class RedisSide:
    """Two replicas sharing one Redis: the reader follows what the writer copies out."""

    def __init__(self, url: str) -> None:
        self.writer = RedisJournal(url, Registry(window=WINDOW), lease_s=0.5)
        self.other = RedisJournal(url, Registry(window=WINDOW), lease_s=0.5)

    async def open(self) -> None:
        await self.writer.start()
        await self.other.start()

    async def start(self, session: str, gen_id: str) -> Journal:
        journal = Journal(session, gen_id, None, f"{session}:{gen_id}")
        self.writer.registry.add(journal)
        self.writer.track(journal, record(journal))
        return journal

    async def reader(self, gen_id: str) -> Journal:
        await asyncio.sleep(0.05)  # the writer copies out in the background (within a round trip)
        return await self.other.follow(await self.other.lookup(None, gen_id, None))

    async def ended(self, journal: Journal) -> None:
        self.writer.registry.finished(journal)

    async def lookup(self, gen_id: str) -> None:
        await asyncio.sleep(0.05)  # the writer copies out in the background (within a round trip)
        await self.other.lookup(None, gen_id, None)

    async def close(self) -> None:
        await self.writer.close()
        await self.other.close()


def record(journal: Journal) -> Record:
    return Record(journal.session, journal.gen_id, None, journal.token_digest, "tiny", "", {"max_tokens": 9}, None)


@pytest.fixture(params=["memory", "redis"])
async def side(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemorySide()
        return
    s = RedisSide(request.getfixturevalue("redis_url"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_reader_gets_every_message_once_in_order_waits_for_more_and_sees_the_end(side: Any) -> None:
    gen_id = "g-" + secrets.token_hex(4)
    journal = await side.start("s1", gen_id)
    journal.prompt_ids = (1, 2, 3)
    journal.append(Entry('{"type":"started"}'))
    journal.append(Entry('{"text":"a"}', 1, ids=(7,)))
    journal.append(Entry('{"text":"bc"}', 2, ids=(8, 9)))
    reader = await side.reader(gen_id)
    await wait_until(lambda: reader.last_seq >= 2, timeout=3)
    assert [e.data for e in reader.read(1)] == ['{"text":"a"}', '{"text":"bc"}']  # read from seq 1
    assert [e.ids for e in reader.entries] == [(), (7,), (8, 9)] and reader.tokens == 3
    waiting = asyncio.create_task(reader.wait_beyond(2))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # nothing new yet
    journal.append(Entry('{"text":"d"}', 1, ids=(10,)))
    await asyncio.wait_for(waiting, scaled(3))
    assert reader.entries[3].data == '{"text":"d"}'
    journal.append(Entry('{"type":"complete"}', final=True))
    await side.ended(journal)
    await wait_until(lambda: reader.finished, timeout=3)
    assert reader.last_seq == 4 and reader.entries[-1].final
    assert [e.data for e in reader.entries] == [e.data for e in journal.entries]


async def test_an_ended_generation_expires_with_the_resume_window(side: Any) -> None:
    gen_id = "g-" + secrets.token_hex(4)
    journal = await side.start("s1", gen_id)
    journal.append(Entry('{"type":"started"}'))
    journal.append(Entry('{"type":"complete"}', final=True))
    await side.ended(journal)
    await asyncio.sleep(0.2)
    await side.lookup(gen_id)  # still there within the window
    await asyncio.sleep(WINDOW + 0.3)
    with pytest.raises(RequestError):
        await side.lookup(gen_id)


async def test_a_follower_takes_over_a_generation_whose_replica_is_gone(redis_url: str) -> None:
    """Failover: while the running replica renews its lease, a follower only follows; once it stops (dies), the
    follower takes the lease, gets the request and every token id so far, and its next message has the next seq."""
    a = RedisJournal(redis_url, Registry(window=5), lease_s=1.0)
    b = RedisJournal(redis_url, Registry(window=5), lease_s=1.0)
    await a.start()
    await b.start()
    taken: list[tuple[Journal, Record]] = []
    b.on_takeover = lambda journal, rec: taken.append((journal, rec))
    gen_id = "g-" + secrets.token_hex(4)
    try:
        journal = Journal("s1", gen_id, None, f"s1:{gen_id}")
        a.registry.add(journal)
        a.track(journal, record(journal))
        journal.prompt_ids = (1, 2, 3)
        journal.append(Entry('{"type":"started"}'))
        journal.append(Entry('{"text":"a"}', 1, ids=(7,)))
        await asyncio.sleep(0.05)
        follower = await b.follow(await b.lookup(None, gen_id, None))
        journal.append(Entry('{"text":"b"}', 1, ids=(8,)))
        await asyncio.sleep(2.5)  # over two lease periods: a renews, b follows
        assert not taken and follower.follower and follower.last_seq == 2
        await a.close()  # a dies: nobody renews
        await wait_until(lambda: bool(taken), timeout=6)
        got, rec = taken[0]
        assert got is follower and not got.follower and b.takeovers == 1
        assert rec.prompt_ids == (1, 2, 3) and rec.params == {"max_tokens": 9}
        assert [t for e in got.entries for t in e.ids] == [7, 8]
        got.append(Entry('{"text":"c"}', 1, ids=(9,)))  # b goes on with seq 3
        got.append(Entry('{"type":"complete"}', final=True))
        await asyncio.sleep(0.1)
        c = RedisJournal(redis_url, Registry(window=5), lease_s=1.0)
        await c.start()
        try:
            third = await c.follow(await c.lookup(None, gen_id, None))
            await wait_until(lambda: third.finished, timeout=3)
            assert [e.data for e in third.entries] == [e.data for e in got.entries]
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_lost_its_lease_stops_its_generation(redis_url: str) -> None:
    """Two replicas must never both write one generation: the one whose lease was taken stops its producer."""
    a = RedisJournal(redis_url, Registry(window=5), lease_s=1.0)
    await a.start()
    try:
        gen_id = "g-" + secrets.token_hex(4)
        journal = Journal("s1", gen_id, None, f"s1:{gen_id}")
        a.track(journal, record(journal))
        journal.produced_by(asyncio.create_task(asyncio.sleep(30)))
        journal.append(Entry('{"type":"started"}'))
        await asyncio.sleep(0.4)
        assert not journal.task.done()
        await a.redis.set(f"tokenwire:s1:{gen_id}:lease", "another-replica")
        await wait_until(lambda: journal.task is not None and journal.task.cancelled(), timeout=6)
    finally:
        await a.close()


async def test_writes_redis_cannot_keep_up_with_are_dropped_not_queued_without_bound(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local journal goes on whatever Redis does; what waits for Redis is bounded."""
    import tokenwire.server.resume.redis_journal as rj

    monkeypatch.setattr(rj, "MAX_QUEUED", 5)
    shared = RedisJournal(redis_url, Registry(window=5))  # not started: nothing drains its queue
    journal = Journal("s1", "g-" + secrets.token_hex(4), None, "s1:g")
    shared.track(journal, record(journal))
    for i in range(20):
        journal.append(Entry(f'{{"n":{i}}}', 1))
    assert journal.last_seq == 19 and shared._queue.qsize() == 5 and shared.dropped == 15
    await shared.close()
