"""A follower: the task that fills a local journal from another replica's generation in the shared journal.

It replays what the generation's Redis Stream holds, then reads it live; writes how far its client has read (the
running replica's flow control follows it); and when the running replica's lease is gone while the generation has
not ended, catches up with the last messages and takes the generation over (redis_journal.py: ``take``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

from tokenwire.server.resume.journal import Journal
from tokenwire.server.resume.log import Entry
from tokenwire.server.resume.record import Remote

if TYPE_CHECKING:
    from tokenwire.server.resume.redis_journal import RedisJournal

log = logging.getLogger(__name__)

CURSOR_DELAY_S = 0.02  # a follower writes its reader's position at most this often
FOLLOW_BLOCK_MS = 250  # a follower's blocking read; between reads it checks the lease


def entry_of(fields: dict[bytes, bytes]) -> Entry:
    """A message as the shared journal's stream holds it (redis_journal.py's ``entry_fields``)."""
    ids = fields.get(b"i", b"")
    return Entry(
        fields[b"d"].decode("utf-8"),
        int(fields.get(b"t", b"0")),
        fields.get(b"f") == b"1",
        tuple(int(x) for x in ids.split(b",")) if ids else (),
    )


def seq_of(stream_id: bytes | str) -> int:
    raw = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(raw.split("-", 1)[0]) - 1


class Follow:
    """The task that fills a follower journal from the stream, reports its reader, and takes over if need be."""

    def __init__(self, shared: RedisJournal, journal: Journal, remote: Remote, log_key: str, last_id: str) -> None:
        self.shared = shared
        self.journal = journal
        self.remote = remote
        self.log_key = log_key
        self.last_id = last_id
        self.nonce = secrets.token_hex(8)
        self._cursor_task: asyncio.Task[None] | None = None
        self._cursor_written = 0.0

    def cursor_moved(self) -> None:
        if self.journal.follower and self._cursor_task is None and self.journal.holder is not None:
            self._cursor_task = asyncio.get_running_loop().create_task(self._write_cursor())

    async def _write_cursor(self) -> None:
        try:
            await asyncio.sleep(CURSOR_DELAY_S)
            journal = self.journal
            await self.shared.write_reader(self.remote.key, journal.gen_id, journal.sent_seq, self.nonce)
            self._cursor_written = time.monotonic()
        except Exception as exc:
            log.debug("could not write the reader's position: %s", exc)
        finally:
            self._cursor_task = None

    async def run(self) -> None:
        journal, shared = self.journal, self.shared
        try:
            self.cursor_moved()
            while journal.follower and not journal.finished:
                if journal.holder is None and journal.bound is not None:
                    break  # its connection went: stop following (the running replica pauses it)
                got = await shared.redis.xread({self.log_key: self.last_id}, block=FOLLOW_BLOCK_MS)
                if journal.finished or not journal.follower:
                    break  # closed meanwhile: its connection went
                for _, items in got or []:
                    for stream_id, fields in items:
                        if seq_of(stream_id) != journal.last_seq + 1:
                            continue  # written twice by a replica that lost its lease: once is enough
                        journal.append(entry_of(fields))
                        self.last_id = stream_id.decode()
                if journal.finished:
                    break
                if time.monotonic() - self._cursor_written > shared.lease_s / 3:
                    self.cursor_moved()  # keep the reader's record alive
                if not got and await self._gone() and await shared.take(journal, self.remote.record):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("following %s failed: %s", journal.engine_id, exc)
        finally:
            if journal.follower:
                with contextlib.suppress(Exception):
                    await shared.drop_reader(self.remote.key, journal.gen_id, self.nonce)
                if journal.finished:
                    shared.registry.finished(journal)
                else:
                    journal.close()

    async def _gone(self) -> bool:
        """Whether the generation's replica is gone (no lease) while it has not ended (nor was aborted)."""
        _, meta, lease, _, _ = self.shared.keys_of(self.remote.key, self.journal.gen_id)
        pipe = self.shared.redis.pipeline(transaction=False)
        pipe.exists(lease)
        pipe.hget(meta, "closed")
        has_lease, closed = await pipe.execute()
        if closed == b"1":
            self.journal.close()  # aborted there: what was made is all there is
            return False
        if has_lease:
            return False
        # Catch up with whatever its replica wrote last before taking it over.
        for stream_id, fields in await self.shared.redis.xrange(self.log_key, min=f"({self.last_id}"):
            if seq_of(stream_id) == self.journal.last_seq + 1:
                self.journal.append(entry_of(fields))
                self.last_id = stream_id.decode()
        return not self.journal.finished
