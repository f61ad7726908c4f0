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

Beyond one process: what a generation's messages go through (append, read from a seq, wait for more, finish,
expire) is the same with the journal kept here or in Redis (redis_journal.py, ``--journal redis://...``): the
replica that runs a generation keeps its journal here and copies each message out (:class:`Mirror`); a replica
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
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenwire.server.redis_journal import RedisJournal


@dataclass(slots=True, frozen=True)
class Entry:
    """One message of a generation: its JSON text, and the tokens it carries (for the counters)."""

    data: str
    tokens: int = 0
    final: bool = False  # complete or error: the generation's last message
    ids: tuple[int, ...] = ()  # the ids of the tokens it carries (a shared journal keeps them for failover)


class Holder(Protocol):
    """A connection that delivers journals."""

    @property
    def is_open(self) -> bool: ...


class Mirror(Protocol):
    """Where a journal's messages are copied beyond this process (a shared journal: redis_journal.py)."""

    def appended(self, journal: Journal, seq: int, entry: Entry) -> None: ...

    def held(self, journal: Journal, held: bool) -> None:
        """A connection of this process took the journal (True) or let it go (False)."""

    def closed(self, journal: Journal) -> None:
        """It ended without a last message (aborted): nobody may take it over."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class MessageLog:
    """The messages of one generation, in ``seq`` order (entry ``i`` has ``seq == i``): what they go through wherever
    they are kept. Append, read from a seq, wait for more, finish; expiry belongs to whoever keeps logs (here
    :meth:`Registry.sweep`; in Redis, the keys' time to live). No connections, no tasks: those are
    :class:`Journal`'s."""

    __slots__ = ("_grew", "dropped", "entries", "finished", "gen_id", "nbytes", "tokens")

    def __init__(self, gen_id: str) -> None:
        self.gen_id = gen_id
        self.entries: list[Entry] = []
        self.finished = False  # no more entries will come
        self.nbytes = 0
        self.tokens = 0  # tokens in all entries
        self.dropped = False  # its entries were let go (let_go)
        self._grew = asyncio.Event()

    @property
    def last_seq(self) -> int:
        """The seq of the newest message (-1 before the first)."""
        return len(self.entries) - 1

    def append(self, entry: Entry) -> int:
        """Add the next message; returns its seq."""
        if self.finished:
            raise RuntimeError(f"generation {self.gen_id!r} already ended")
        self.entries.append(entry)
        self.nbytes += len(entry.data)
        self.tokens += entry.tokens
        if entry.final:
            self.finished = True
        self._wake()
        return len(self.entries) - 1

    def read(self, first_seq: int) -> list[Entry]:
        """The messages from ``first_seq`` on, as far as they go now."""
        return self.entries[max(0, first_seq) :]

    def let_go(self) -> None:
        """Free the entries of a finished log (its keeper needs only the result); reading it gives nothing more."""
        self.entries = []
        self.nbytes = 0
        self.dropped = True

    def close(self) -> None:
        """No more entries (the producer stopped without a final message: aborted or shut down)."""
        if not self.finished:
            self.finished = True
            self._wake()

    async def wait_beyond(self, seq: int) -> None:
        """Return once a message after ``seq`` exists or the log is finished."""
        while self.last_seq <= seq and not self.finished:
            await self._grew.wait()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()


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

    @property
    def key(self) -> tuple[str, str]:
        return (self.session, self.gen_id)

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


class ResumeRefused(Exception):
    """A ``resume`` that names no journal this client may have; ``param`` is the field at fault."""

    def __init__(self, message: str, param: str = "id", ambiguous: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.ambiguous = ambiguous


@dataclass(slots=True)
class Registry:
    """Journals by (session, id), kept ``window`` seconds after they go idle, within ``budget_bytes``."""

    window: float = 60.0
    budget_bytes: int = 64 << 20
    clock: Callable[[], float] = time.monotonic
    shared: RedisJournal | None = None  # a journal shared by every replica (resume anywhere, failover)
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
        journal.idle_since = self.clock()
        if not self.enabled:
            self.forget(journal)

    def attach(self, journal: Journal, holder: Holder, first_seq: int = 0) -> None:
        """``holder`` delivers ``journal`` from ``first_seq`` on."""
        journal.holder = journal.bound = holder
        if not journal.finished:
            journal.idle_since = None
        if journal.mirror is not None:
            journal.mirror.held(journal, True)
        journal.rewind(first_seq)

    def detach(self, journal: Journal) -> bool:
        """Its connection went away. Returns True when the generation must be aborted now (resume is off)."""
        journal.holder = None
        if journal.mirror is not None:
            journal.mirror.held(journal, False)
        if journal.follower:  # another replica makes it: only this copy goes
            self.forget(journal)
            journal.close()
            return False
        if journal.finished:
            return False
        if not self.enabled:
            self.forget(journal)
            return True
        journal.idle_since = self.clock()
        journal.progressed()  # no reader now: its producer pauses it
        return False

    def remote_reader(self, journal: Journal, reader: Holder | None, sent_seq: int) -> None:
        """A reader connected to another replica (a shared journal) has read ``journal`` up to ``sent_seq``, or
        (``reader`` None) went away: its flow control follows it as it follows a local reader."""
        if reader is None:
            journal.holder = None
            if not journal.finished:
                journal.idle_since = self.clock()
            journal.progressed()
            return
        journal.holder = reader
        if not journal.finished:
            journal.idle_since = None
        journal.rewind(sent_seq + 1)

    @staticmethod
    def may_take_over(journal: Journal, holder: Holder, token: str | None) -> bool:
        """Whether ``holder`` may take ``journal``: it is its own, its connection is gone, or ``token`` is right."""
        bound = journal.bound
        if bound is None or bound is holder or not bound.is_open:
            return True
        return token is not None and hmac.compare_digest(token_digest(token), journal.token_digest)

    def find(self, owner: str | None, gen_id: str, session: str | None) -> Journal:
        """The journal a ``resume`` names. Raises :class:`ResumeRefused` when there is none, or several."""
        if session is not None:
            found = self._journals.get((session, gen_id))
            matches = [found] if found is not None and found.owner == owner else []
        else:
            matches = [j for j in self._journals.values() if j.gen_id == gen_id and j.owner == owner]
        if len(matches) == 1:
            return matches[0]
        if not matches and not self.enabled:
            raise ResumeRefused(f"no generation with id {gen_id!r} can be resumed: resume is off on this server")
        if not matches:
            raise ResumeRefused(
                f"no generation with id {gen_id!r} can be resumed: it never ran here, or it ended or lost its "
                f"connection more than {self.window:g} s ago"
            )
        raise ResumeRefused(
            f"{len(matches)} generations have id {gen_id!r}; add the 'session' from the hello message of the "
            "connection that started it",
            param="session",
            ambiguous=True,
        )

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
