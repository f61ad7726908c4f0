"""A journal every replica shares, in Redis: resume a stream on any replica, and go on with it when its replica dies.

The replica that runs a generation keeps its journal in memory as always (journal.py) and copies every message to
a Redis Stream (``--journal redis://HOST:PORT/DB``), numbered by ``seq`` (stream ID ``seq+1-0``, so a message can
be written once only), together with the token ids it carries; the request itself (its prompt's token ids and
sampling parameters) is kept beside it. Per generation, under ``tokenwire:{session}:{id}:``::

    log     the messages (XADD with explicit IDs)      meta    the request, and who holds it (hash)
    lease   the replica that runs it (PX, renewed)     reader  a reader on another replica: its last sent seq
    cancel  a reader on another replica cancelled it

A ``resume`` that finds nothing in this process looks in Redis and *follows* the generation there: a local journal
is filled from the stream (replayed, then read live), and the connection delivers it as any other. The follower
writes how far its client has read into ``reader``; the running replica reads it (every ``READER_POLL_S``) as if
its own connection were reading: its flow control pauses and continues the generation by it.

Failover: the running replica renews its lease every third of ``lease_s``. When a follower finds no lease on an
unfinished generation (its replica died), it takes the lease and goes on with the generation itself: the request
is admitted again with its prompt plus the tokens already in the log (``Continuation``; the prefix cache makes
that cheap) and the next message gets the next seq: the client sees the answer go on, nothing lost or repeated.
A replica that finds its lease taken stops its generation. Everything expires with the resume window once nobody
renews it, so an answer whose replica died and that nobody resumes is gone after the window.

One class, :class:`RedisJournal`, over 400 lines with its docstrings: its parts (copying out through one writer,
renewing leases, polling remote readers, lookup, take-over) share its keys, its queue and its record of what runs
here; a follower's task is follow.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable
from typing import Any

from tokenwire.server.resume.follow import Follow, entry_of
from tokenwire.server.resume.journal import Journal, Registry, ambiguous, not_found
from tokenwire.server.resume.log import Entry
from tokenwire.server.resume.record import Record, Remote

log = logging.getLogger(__name__)

PREFIX = "tokenwire"
READER_POLL_S = 0.05  # how often the running replica reads its remote readers' positions
MAX_QUEUED = 100_000  # writes waiting for Redis; past it new ones are dropped (the local journals go on)


class RemoteReader:
    """The holder of a journal whose reader is connected to another replica (see the module docstring)."""

    __slots__ = ("nonce", "replica")

    def __init__(self, replica: str, nonce: str) -> None:
        self.replica = replica
        self.nonce = nonce

    @property
    def is_open(self) -> bool:
        return True

    async def hand_over(self, gen_id: str, journal: Journal) -> None:
        """Nothing to stop here: the reader's replica stops sending when the takeover reaches it."""


def entry_fields(entry: Entry) -> dict[str, str]:
    fields = {"d": entry.data, "t": str(entry.tokens), "i": ",".join(map(str, entry.ids))}
    if entry.final:
        fields["f"] = "1"
    return fields


# Renew a lease only while it is still ours, and keep the generation's keys alive with it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  for i = 2, #KEYS do redis.call('pexpire', KEYS[i], ARGV[3]) end
  return 1
end
return 0
"""

Takeover = Callable[[Journal, Record], None]
Cancel = Callable[[Journal], None]


class RedisJournal:
    """The process's side of the shared journal: copies its generations out, finds and follows others'."""

    def __init__(self, url: str, registry: Registry, lease_s: float = 3.0, replica: str | None = None) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.registry = registry
        self.window = registry.window
        self.lease_s = lease_s
        self._lease_ms = int(lease_s * 1000)  # a lease, and a reader's record, last this long unless renewed
        self._keep_ms = int((self.window + lease_s) * 1000)  # a running generation's keys, renewed with its lease
        self._window_ms = int(self.window * 1000)  # an ended one's keys: resumable for the window
        self.replica = replica or secrets.token_hex(6)
        self.redis: Any = aioredis.Redis.from_url(url)  # its replies are bytes (typed loosely by redis-py)
        self.on_takeover: Takeover | None = None  # set by the server: starts a producer for a journal it takes
        self.on_cancel: Cancel | None = None  # set by the server: aborts a generation a remote reader cancelled
        self._own: dict[str, Journal] = {}  # journals this process runs and copies out, by key
        self._readers: dict[str, str] = {}  # by key: the nonce of the last remote reader seen
        self._records: dict[str, Record] = {}
        self._queue: asyncio.Queue[tuple[str, Journal | None, Callable[[Any], Any] | asyncio.Future[None]]] = (
            asyncio.Queue()
        )
        self._handed: list[str] = []  # leases of generations handed off at shutdown: dropped on close
        self.dropped = 0  # writes dropped because Redis did not keep up (MAX_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []
        self._renew: Any = None
        self.takeovers = 0  # generations this replica went on with after their replica died

    # -- life cycle
    async def start(self) -> None:
        """Connect (a clear error when Redis cannot be reached) and start copying, renewing and polling."""
        try:
            await self.redis.ping()
        except Exception as exc:
            raise RuntimeError(f"cannot reach the journal at {self.url}: {exc}") from exc
        self._renew = self.redis.register_script(_RENEW)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(work()) for work in (self._write, self._leases, self._poll)]
        log.info("shared journal at %s (replica %s)", self.url, self.replica)

    async def close(self) -> None:
        """Write what is queued (bounded), let go of handed-off generations' leases, stop."""
        if self._tasks and not self._tasks[0].done():
            done = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(("", None, done))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(done, 2.0)
        if self._handed:
            with contextlib.suppress(Exception):
                await self.redis.delete(*self._handed)
            self._handed.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # -- keys
    @staticmethod
    def key(session: str, gen_id: str) -> str:
        return f"{PREFIX}:{session}:{gen_id}"

    def keys_of(self, key: str, gen_id: str) -> tuple[str, str, str, str, str]:
        return f"{key}:log", f"{key}:meta", f"{key}:lease", f"{key}:reader", f"{PREFIX}:ids:{gen_id}"

    async def cancel(self, journal: Journal) -> None:
        """The reader of a generation another replica runs cancels it: that replica aborts it (within a poll)."""
        key = self.key(journal.session, journal.gen_id)
        await self.redis.set(f"{key}:cancel", "1", px=self._keep_ms)

    # -- this replica's generations (the Mirror side)
    def track(self, journal: Journal, record: Record) -> None:
        """A generation starts here: copy its messages out (from its first, which also writes its record)."""
        key = self.key(journal.session, journal.gen_id)
        self._own[key] = journal
        self._records[key] = record
        journal.mirror_to(self)

    def appended(self, journal: Journal, seq: int, entry: Entry) -> None:
        key = self.key(journal.session, journal.gen_id)
        log_key, meta, lease, _, ids = self.keys_of(key, journal.gen_id)
        fields = entry_fields(entry)
        first: dict[str, str] = {}
        if seq == 0 and key in self._records:  # what the connection knew, and now the prompt's token ids
            record = dataclasses.replace(self._records[key], prompt_ids=journal.prompt_ids)
            self._records[key] = record
            first = {"record": record.encode(), "held": "1" if journal.holder else ""}

        def write(pipe: Any) -> None:
            if first:
                pipe.hset(meta, mapping=first)
                pipe.set(lease, self.replica, px=self._lease_ms)
                pipe.sadd(ids, journal.session)
                pipe.pexpire(meta, self._keep_ms)
                pipe.pexpire(ids, self._keep_ms)
            pipe.xadd(log_key, fields, id=f"{seq + 1}-0")
            if first:
                pipe.pexpire(log_key, self._keep_ms)
            if entry.final:  # it ended: resumable for the window, and nobody is to go on with it
                pipe.delete(lease)
                for k in (log_key, meta, ids):
                    pipe.pexpire(k, self._window_ms)

        self._put(key, journal, write)
        if entry.final:
            self._forget_own(key)

    def held(self, journal: Journal, held: bool) -> None:
        key = self.key(journal.session, journal.gen_id)
        if key not in self._own:
            return
        meta = self.keys_of(key, journal.gen_id)[1]

        def write(pipe: Any) -> None:
            pipe.hset(meta, "held", "1" if held else "")
            pipe.pexpire(meta, self._keep_ms)

        self._put(key, journal, write)

    def closed(self, journal: Journal) -> None:
        key = self.key(journal.session, journal.gen_id)
        if self._own.get(key) is not journal:  # it was taken over: not ours to close
            return
        _, meta, lease, _, _ = self.keys_of(key, journal.gen_id)

        def close(pipe: Any) -> None:
            pipe.hset(meta, "closed", "1")
            pipe.pexpire(meta, self._window_ms)
            pipe.delete(lease)

        self._put(key, journal, close)
        self._forget_own(key)

    def hand_off(self, journal: Journal) -> bool:
        """This replica stops (a rolling update): let another replica go on with the generation when its client
        resumes there, at once (its lease is dropped on close), instead of ending it. False if it is not ours."""
        key = self.key(journal.session, journal.gen_id)
        if self._own.get(key) is not journal or journal.finished:
            return False
        self._forget_own(key)  # no renewal, and its end here is not an abort (see closed)
        _, meta, lease, _, _ = self.keys_of(key, journal.gen_id)
        self._handed.append(lease)
        self._put(key, None, lambda pipe: pipe.hset(meta, "held", ""))  # its socket closes
        return True

    def _forget_own(self, key: str) -> None:
        self._own.pop(key, None)
        self._records.pop(key, None)
        self._readers.pop(key, None)

    def _put(self, key: str, journal: Journal | None, op: Callable[[Any], Any]) -> None:
        """Queue a write for the writer task; past MAX_QUEUED (Redis is down or slow) it is dropped, with a warning
        the first time: resume elsewhere and failover stop working for those generations, nothing else does."""
        if self._queue.qsize() >= MAX_QUEUED:
            if self.dropped == 0:
                log.warning("the shared journal falls behind (%d writes queued): dropping writes", MAX_QUEUED)
            self.dropped += 1
            return
        self._queue.put_nowait((key, journal, op))

    async def _write(self) -> None:
        """The one writer: whatever queued since the last round goes in one pipeline, in order."""
        while True:
            ops = [await self._queue.get()]
            while not self._queue.empty():
                ops.append(self._queue.get_nowait())
            pipe = self.redis.pipeline(transaction=False)
            owners: list[tuple[str, Journal | None]] = []
            flushed: list[asyncio.Future[None]] = []
            for key, journal, op in ops:
                if isinstance(op, asyncio.Future):  # close() waits for what came before it
                    flushed.append(op)
                    continue
                before = len(pipe.command_stack)
                try:
                    op(pipe)
                except Exception:  # a bug in one write: log it, the others go on
                    log.exception("could not prepare a write to the shared journal")
                    del pipe.command_stack[before:]
                owners.extend([(key, journal)] * (len(pipe.command_stack) - before))
            try:
                results = await pipe.execute(raise_on_error=False) if owners else []
            except Exception as exc:  # Redis is gone: the local journals go on; resume elsewhere will not work
                log.warning("could not write %d commands to the shared journal: %s", len(owners), exc)
                continue
            finally:
                for future in flushed:
                    if not future.done():
                        future.set_result(None)
            for (key, journal), result in zip(owners, results, strict=False):
                if isinstance(result, Exception) and journal is not None:
                    self._lost(key, journal, f"a write failed: {result}")

    def _lost(self, key: str, journal: Journal, why: str) -> None:
        """Another replica goes on with this generation: stop it here (its connection gets nothing more)."""
        if self._own.get(key) is not journal:
            return
        log.warning("generation %s is no longer this replica's (%s): stopped here", journal.engine_id, why)
        self._forget_own(key)
        journal.mirror_to(None)
        if journal.task is not None:
            journal.task.cancel()

    async def _leases(self) -> None:
        """Renew the leases of the generations running here (one round trip for all); one that is lost stops."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            own = [(k, j) for k, j in self._own.items() if j.last_seq >= 0]  # first message (and lease) written
            if not own:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for key, journal in own:
                    log_key, meta, lease, _, ids = self.keys_of(key, journal.gen_id)
                    args = [self.replica, self._lease_ms, self._keep_ms]
                    await self._renew(keys=[lease, log_key, meta, ids], args=args, client=pipe)  # queued in the pipe
                results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # Redis unreachable: try again next round (the leases may run out meanwhile)
                log.warning("could not renew the leases of %d generations: %s", len(own), exc)
                continue
            for (key, journal), ok in zip(own, results, strict=False):
                if ok == 0 and self._own.get(key) is journal and not journal.finished:
                    self._lost(key, journal, "its lease was taken")

    async def _poll(self) -> None:
        """Where readers on other replicas are: each moves the cursor of the journal it reads, as a local reader
        would; a new one with a takeover takes it from the local connection. Journals a local connection holds
        are looked at every tenth round only (a takeover, or a cancel, is rare and not urgent)."""
        rounds = 0
        while True:
            await asyncio.sleep(READER_POLL_S)
            rounds += 1
            everyone = rounds % 10 == 0
            own = [
                (k, j)
                for k, j in self._own.items()
                if not j.finished and (everyone or j.holder is None or isinstance(j.holder, RemoteReader))
            ]
            if not own:
                continue
            keys = [self.keys_of(k, j.gen_id)[3] for k, j in own] + [f"{k}:cancel" for k, _ in own]
            try:
                values = await self.redis.mget(keys)
            except Exception as exc:
                log.debug("could not read remote readers: %s", exc)
                continue
            for (key, journal), value, cancel in zip(own, values[: len(own)], values[len(own) :], strict=True):
                if cancel is not None and self.on_cancel is not None:
                    self.on_cancel(journal)
                await self._reader_moved(key, journal, value)

    async def _reader_moved(self, key: str, journal: Journal, value: bytes | None) -> None:
        holder = journal.holder
        if value is None:
            if isinstance(holder, RemoteReader):  # its reader went away
                self.registry.remote_reader(journal, None, journal.sent_seq)
            return
        replica, seq_text, nonce = value.decode().split("|", 2)
        if replica == self.replica:
            return  # written by this replica while it followed the generation, before it took it over
        seq = int(seq_text)
        if isinstance(holder, RemoteReader) and holder.nonce == nonce:
            if seq > journal.sent_seq:
                self.registry.remote_reader(journal, holder, seq)
            return
        if holder is not None and not isinstance(holder, RemoteReader):
            if self._readers.get(key) == nonce:
                return  # a reader that was there before this connection resumed it here: stale
            await holder.hand_over(journal.gen_id, journal)  # a resume elsewhere took it from this connection
        self._readers[key] = nonce
        self.registry.remote_reader(journal, RemoteReader(replica, nonce), seq)

    # -- other replicas' generations
    async def lookup(self, owner: str | None, gen_id: str, session: str | None) -> Remote:
        """The generation a ``resume`` names, from the shared journal. Raises RequestError (none, or several)."""
        if session is not None:
            sessions = [session]
        else:
            sessions = sorted(s.decode() for s in await self.redis.smembers(f"{PREFIX}:ids:{gen_id}"))
        found: list[Remote] = []
        for s in sessions[:64]:
            key = self.key(s, gen_id)
            _, meta, lease, _, _ = self.keys_of(key, gen_id)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(meta)
            pipe.get(lease)
            data, replica = await pipe.execute()
            if not data or b"record" not in data:
                continue
            record = Record.decode(data[b"record"])
            if record.owner != owner:
                continue
            found.append(
                Remote(
                    key,
                    record,
                    replica.decode() if replica else None,
                    data.get(b"held") == b"1",
                    data.get(b"closed") == b"1",
                )
            )
        if len(found) == 1:
            return found[0]
        if not found:
            raise not_found(
                gen_id,
                f"it never ran on any replica, or it ended or lost its connection more than {self.window:g} s ago",
            )
        raise ambiguous(gen_id, len(found))

    async def follow(self, remote: Remote) -> Journal:
        """A local journal of ``remote``: what its log holds now, then (a task) what comes, until its end; it takes
        the generation over when its replica is gone (see the module docstring)."""
        record = remote.record
        journal = Journal.following(record)
        log_key = self.keys_of(remote.key, record.gen_id)[0]
        last_id = "0-0"
        for stream_id, fields in await self.redis.xrange(log_key):
            journal.append(entry_of(fields))
            last_id = stream_id.decode()
        follow = Follow(self, journal, remote, log_key, last_id)
        journal.watch(follow.cursor_moved)
        journal.produced_by(asyncio.get_running_loop().create_task(follow.run()))
        return journal

    async def take(self, journal: Journal, record: Record) -> bool:
        """Take the lease of a generation whose replica is gone, and go on with it here."""
        key = self.key(record.session, record.gen_id)
        lease = self.keys_of(key, record.gen_id)[2]
        if not await self.redis.set(lease, self.replica, nx=True, px=self._lease_ms):
            return False  # another replica was quicker: keep following it
        if self.on_takeover is None:
            await self.redis.delete(lease)
            return False
        journal.taken_over(self)
        self._own[key] = journal
        self._records[key] = record
        self.takeovers += 1
        log.info("replica of %s is gone: going on with it here from seq %d", journal.engine_id, journal.last_seq + 1)
        self.on_takeover(journal, record)
        return True

    async def write_reader(self, key: str, gen_id: str, seq: int, nonce: str) -> None:
        reader = self.keys_of(key, gen_id)[3]
        await self.redis.set(reader, f"{self.replica}|{seq}|{nonce}", px=self._lease_ms)

    async def drop_reader(self, key: str, gen_id: str, nonce: str) -> None:
        reader = self.keys_of(key, gen_id)[3]
        value = await self.redis.get(reader)
        if value is not None and value.decode().endswith("|" + nonce):
            await self.redis.delete(reader)
