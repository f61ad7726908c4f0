"""What lets a WebSocket client resume a generation after losing its connection.

Each generation writes its messages, encoded and numbered by ``seq``, into a :class:`Journal`; the connection
that holds it reads the journal from a cursor and sends. A ``resume`` on another connection attaches the
journal there and reads from ``after_seq + 1``, so every message reaches the client once and in order.

The journal also tells how far the reader is behind: the holder marks each message it wrote to its socket
(:meth:`Journal.mark_sent`), and ``unsent_tokens`` is what was generated but not yet written. The generation's
producer watches it (``on_progress`` is called whenever it moves, or the holder comes or goes) to pause the
generation when its reader falls behind or is gone, and to let it go on when the reader catches up.

The :class:`Registry` finds journals for ``resume`` and decides how long they live. A journal is *idle* once its
generation finished or its connection went away (orphaned); an idle journal is kept for ``window`` seconds,
then forgotten (an orphan that nobody resumed is aborted). All journals together stay under a memory budget:
past it, the idle journals that went idle first are dropped first. No I/O here; the clock is injectable.

Beyond one process: what a generation's messages go through (log.py's MessageLog: append, read from a seq, wait for
more, finish, expire) is the same with the journal kept here or in Redis (redis_journal.py, ``--journal
redis://...``): the replica that runs a generation keeps its journal here and copies each message out
(:class:`Mirror`); a replica
that resumes it fills a local *follower* journal from Redis. Either way the connection reads a :class:`Journal`
(``entries``, ``wait_beyond``, ``finished``); the process-only parts (the holding connection, the producer task,
the reader's cursor) never leave the process. tests/unit/test_journal_contract.py runs the same tests on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.resume.log import Entry, MessageLog
from tokenwire.server.resume.record import Record, Remote


class Holder(Protocol):
    """A connection that delivers journals (or, with a shared journal, a reader on another replica)."""

    @property
    def is_open(self) -> bool: ...

    async def hand_over(self, gen_id: str, journal: Journal) -> None:
        """Another connection resumed ``journal``: stop sending it here, without stopping it."""


class Mirror(Protocol):
    """Where a journal's messages are copied beyond this process (a shared journal: redis_journal.py)."""

    def appended(self, journal: Journal, seq: int, entry: Entry) -> None: ...

    def held(self, journal: Journal, held: bool) -> None:
        """A connection of this process took the journal (True) or let it go (False)."""

    def closed(self, journal: Journal) -> None:
        """It ended without a last message (aborted): nobody may take it over."""


class SharedJournal(Protocol):
    """A journal every replica shares (redis_journal.py): what the rest of the server asks of it."""

    on_takeover: Callable[[Journal, Record], None] | None  # go on here with a generation whose replica is gone
    on_cancel: Callable[[Journal], None] | None  # a reader on another replica cancelled a generation running here

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def track(self, journal: Journal, record: Record) -> None:
        """A generation starts here: copy its messages out."""

    def hand_off(self, journal: Journal) -> bool:
        """This replica stops: another one goes on with the generation when its client resumes there."""

    async def cancel(self, journal: Journal) -> None:
        """The reader of a generation another replica runs cancels it."""

    async def lookup(self, owner: str | None, gen_id: str, session: str | None) -> Remote:
        """The generation a ``resume`` names (RequestError when there is none, or several)."""

    async def follow(self, remote: Remote) -> Journal:
        """A local journal filled from ``remote``'s messages, as they come."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def may_take_over(held_elsewhere: bool, token: str | None, digest: str) -> bool:
    """The one takeover check: a generation whose connection is still open (``held_elsewhere``) is taken only with
    its resume token, compared with its digest in constant time; any other, by its id alone."""
    return not held_elsewhere or (token is not None and hmac.compare_digest(token_digest(token), digest))


class Journal(MessageLog):
    """One generation as this process serves it: its messages (:class:`MessageLog`) and the process-only parts: the
    connection that delivers it and how far its reader is, the task that produces it, and where it is copied to.

    ``resume_token`` is a secret sent only in ``started`` (so only to whoever may read the generation): while the
    connection that holds or last held the journal (``bound``) is open, only a ``resume`` carrying it may take the
    generation over; once that connection is gone, the generation's id is enough (PROTOCOL.md)."""

    __slots__ = (
        "bound",
        "engine_id",
        "follower",
        "holder",
        "idle_since",
        "mirror",
        "on_progress",
        "owner",
        "prompt_ids",
        "resume_token",
        "sent_seq",
        "sent_tokens",
        "session",
        "task",
        "token_digest",
    )

    def __init__(
        self, session: str, gen_id: str, owner: str | None, engine_id: str, resume_token: str | None = None
    ) -> None:
        super().__init__(gen_id)
        self.session = session  # the connection that started it: with gen_id, the journal's key
        self.owner = owner  # who may resume it: a digest of the API key, or None without keys
        self.engine_id = engine_id
        self.holder: Holder | None = None  # the connection delivering it, or None
        self.bound: Holder | None = None  # the connection that holds or last held it (see the class docstring)
        self.resume_token = resume_token or secrets.token_urlsafe(16)
        self.token_digest = token_digest(self.resume_token)  # what a takeover is checked against
        self.prompt_ids: tuple[int, ...] = ()  # the prompt's token ids, once started (kept for failover)
        self.mirror: Mirror | None = None  # a shared journal its messages are copied to
        self.follower = False  # its messages come from a shared journal, made by another replica's generation
        self.idle_since: float | None = None  # when it finished or lost its holder (None: running and held)
        self.task: asyncio.Task[None] | None = None  # the task producing the entries
        self.sent_seq = -1  # the last message the holder wrote to its socket
        self.sent_tokens = 0  # tokens in the entries up to sent_seq
        self.on_progress: Callable[[], None] | None = None  # the reader moved, came or went (the producer's flow)

    @classmethod
    def following(cls, record: Record) -> Journal:
        """A local copy of a generation another replica runs, filled from the shared journal (a follower)."""
        journal = cls(record.session, record.gen_id, record.owner, f"{record.session}:{record.gen_id}")
        journal.token_digest = record.token_digest
        journal.follower = True
        journal.prompt_ids = record.prompt_ids
        return journal

    @property
    def key(self) -> tuple[str, str]:
        return (self.session, self.gen_id)

    # -- who makes it, who watches it, where it is copied
    def produced_by(self, task: asyncio.Task[None] | None) -> None:
        """``task`` makes its messages (a producer, or a follower's reader of the shared journal)."""
        self.task = task

    def watch(self, on_progress: Callable[[], None] | None) -> None:
        """Call ``on_progress`` whenever its reader moves, comes or goes (None: stop)."""
        self.on_progress = on_progress

    def began(self, prompt_ids: tuple[int, ...]) -> None:
        """Its generation started with these prompt token ids (kept for failover)."""
        self.prompt_ids = prompt_ids

    def mirror_to(self, mirror: Mirror | None) -> None:
        """Copy its messages to ``mirror`` from now on (None: no more)."""
        self.mirror = mirror

    def taken_over(self, mirror: Mirror) -> None:
        """This replica goes on with a generation it followed: it is made here now, and copied out."""
        self.follower = False
        self.on_progress = None
        self.mirror = mirror

    # -- who delivers it
    def may_take_over(self, holder: Holder, token: str | None) -> bool:
        """Whether ``holder`` may take it: it is its own, its connection is gone, or ``token`` is right."""
        bound = self.bound
        return may_take_over(bound is not None and bound is not holder and bound.is_open, token, self.token_digest)

    def attach(self, holder: Holder, first_seq: int) -> None:
        """``holder`` delivers it from ``first_seq`` on."""
        self.holder = self.bound = holder
        if not self.finished:
            self.idle_since = None
        if self.mirror is not None:
            self.mirror.held(self, True)
        self.rewind(first_seq)

    def detach(self, now: float) -> None:
        """Its connection went away: nobody delivers it now (idle from ``now`` unless it ended before)."""
        self.holder = None
        if self.mirror is not None:
            self.mirror.held(self, False)
        if not self.finished and not self.follower:
            self.idle_since = now

    def release(self, holder: Holder) -> None:
        """``holder`` delivered its last message: it holds it no more."""
        if self.holder is holder:
            self.holder = None

    def read_remotely(self, reader: Holder | None, sent_seq: int, now: float) -> None:
        """A reader on another replica has read it up to ``sent_seq``, or (None) went away."""
        self.holder = reader
        if not self.finished:
            self.idle_since = now if reader is None else None
        if reader is None:
            self.progressed()
        else:
            self.rewind(sent_seq + 1)

    def ended(self, now: float) -> None:
        """Its generation ended: idle from ``now``."""
        self.idle_since = now

    def append(self, entry: Entry) -> int:
        seq = super().append(entry)
        if self.mirror is not None:
            self.mirror.appended(self, seq, entry)
        return seq

    def close(self) -> None:
        if not self.finished and self.mirror is not None:
            self.mirror.closed(self)
        super().close()

    @property
    def unsent_tokens(self) -> int:
        """Tokens generated but not yet written to the reader's socket."""
        return self.tokens - self.sent_tokens

    @property
    def unsent_messages(self) -> int:
        return self.last_seq - self.sent_seq

    def mark_sent(self, seq: int) -> None:
        """The holder wrote message ``seq`` (the one after ``sent_seq``) to its socket."""
        if seq == self.sent_seq + 1 and seq < len(self.entries):
            self.sent_seq = seq
            self.sent_tokens += self.entries[seq].tokens
            self.progressed()

    def rewind(self, first_seq: int) -> None:
        """A (new) holder sends from ``first_seq``: what came before counts as read."""
        first_seq = max(0, min(first_seq, len(self.entries)))
        self.sent_seq = first_seq - 1
        self.sent_tokens = sum(e.tokens for e in self.entries[:first_seq])
        self.progressed()

    def progressed(self) -> None:
        if self.on_progress is not None:
            self.on_progress()


def not_found(gen_id: str, why: str) -> RequestError:
    """A ``resume`` that names no generation this client may have."""
    return RequestError(ErrorCode.NOT_FOUND, f"no generation with id {gen_id!r} can be resumed: {why}", "id", id=gen_id)


def ambiguous(gen_id: str, count: int) -> RequestError:
    """A ``resume`` by id alone that several generations match."""
    return RequestError(
        ErrorCode.INVALID_REQUEST,
        f"{count} generations have id {gen_id!r}; add the 'session' from the hello message of the connection that "
        "started it",
        "session",
        id=gen_id,
    )


@dataclass(slots=True)
class Registry:
    """Journals by (session, id), kept ``window`` seconds after they go idle, within ``budget_bytes``."""

    window: float = 60.0
    budget_bytes: int = 64 << 20
    clock: Callable[[], float] = time.monotonic
    shared: SharedJournal | None = None  # a journal shared by every replica (resume anywhere, failover)
    _journals: dict[tuple[str, str], Journal] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def __len__(self) -> int:
        return len(self._journals)

    def journals(self) -> list[Journal]:
        return list(self._journals.values())

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self._journals.values())

    @property
    def orphaned(self) -> int:
        """Generations still running with no connection to deliver them."""
        return sum(1 for j in self._journals.values() if j.holder is None and not j.finished)

    def add(self, journal: Journal) -> None:
        """Track a new generation. Raises ``KeyError`` if one with the same key is still running."""
        old = self._journals.get(journal.key)
        if old is not None and not old.finished:
            raise KeyError(journal.key)
        self._journals[journal.key] = journal

    def forget(self, journal: Journal) -> None:
        if self._journals.get(journal.key) is journal:
            del self._journals[journal.key]

    def finished(self, journal: Journal) -> None:
        """Its generation ended: resumable for ``window`` more seconds."""
        journal.ended(self.clock())
        if not self.enabled:
            self.forget(journal)

    def attach(self, journal: Journal, holder: Holder, first_seq: int = 0) -> None:
        """``holder`` delivers ``journal`` from ``first_seq`` on."""
        journal.attach(holder, first_seq)

    def detach(self, journal: Journal) -> bool:
        """Its connection went away. Returns True when the generation must be aborted now (resume is off)."""
        journal.detach(self.clock())
        if journal.follower:  # another replica makes it: only this copy goes
            self.forget(journal)
            journal.close()
            return False
        if journal.finished:
            return False
        if not self.enabled:
            self.forget(journal)
            return True
        journal.progressed()  # no reader now: its producer pauses it
        return False

    def remote_reader(self, journal: Journal, reader: Holder | None, sent_seq: int) -> None:
        """A reader connected to another replica (a shared journal) has read ``journal`` up to ``sent_seq``, or
        (``reader`` None) went away: its flow control follows it as it follows a local reader."""
        journal.read_remotely(reader, sent_seq, self.clock())

    def find(self, owner: str | None, gen_id: str, session: str | None) -> Journal:
        """The journal a ``resume`` names. Raises :class:`RequestError` when there is none, or several."""
        if session is not None:
            found = self._journals.get((session, gen_id))
            matches = [found] if found is not None and found.owner == owner else []
        else:
            matches = [j for j in self._journals.values() if j.gen_id == gen_id and j.owner == owner]
        if len(matches) == 1:
            return matches[0]
        if not matches and not self.enabled:
            raise not_found(gen_id, "resume is off on this server")
        if not matches:
            raise not_found(
                gen_id, f"it never ran here, or it ended or lost its connection more than {self.window:g} s ago"
            )
        raise ambiguous(gen_id, len(matches))

    def sweep(self) -> list[Journal]:
        """Forget journals idle for longer than the window, then the longest idle while over the budget.

        Returns the forgotten journals whose generation still runs: the caller aborts them."""
        now = self.clock()
        gone = [j for j in self._journals.values() if j.idle_since is not None and now - j.idle_since >= self.window]
        for j in gone:
            self.forget(j)
        total = self.nbytes
        if total > self.budget_bytes:
            idle = sorted((j for j in self._journals.values() if j.idle_since is not None), key=_idle_since)
            for j in idle:
                if total <= self.budget_bytes:
                    break
                self.forget(j)
                gone.append(j)
                total -= j.nbytes
        return [j for j in gone if not j.finished]


def _idle_since(journal: Journal) -> float:
    return journal.idle_since if journal.idle_since is not None else float("inf")
