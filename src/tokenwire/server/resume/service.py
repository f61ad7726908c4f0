"""Everything that lets a generation outlive its connection, in one place: resume, follow, hand-over, abandon and
take-over.

A door that delivers journals (the WebSocket protocol's connection) asks :class:`Resumes` and gets an answer back;
nothing else walks between the journal, the shared journal and the door:

- **resume** (:meth:`Resumes.find`): the journal a ``resume`` names, here (journal.py's :class:`Registry`) or, with
  a shared journal, on another replica, whose messages a local *follower* journal then carries; checked once for
  ``after_seq`` and once for who may take it (:func:`~tokenwire.server.resume.journal.may_take_over`, constant-time),
  or refused with a :class:`~tokenwire.server.requests.errors.RequestError` naming the field at fault;
- **hand-over** (:meth:`Resumes.hand_over`): the connection that held it stops sending it;
- **abandon** (:meth:`Resumes.let_go`, :meth:`Resumes.abandon`, :meth:`Resumes.expire`): a connection that went
  away leaves its generations orphaned (paused, resumable) or ends them; a stopping server hands them to another
  replica or forgets them; the resume window and memory budget expire them;
- **take-over** (:meth:`Resumes.take_over`): a generation whose replica died goes on here from the tokens in its
  journal; the door says how (``restart``), with the request rebuilt from the shared journal's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from tokenwire.engine.interface import Continuation, GenerationRequest, SamplingParams
from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.resume.journal import Holder, Journal, Registry, SharedJournal, may_take_over
from tokenwire.server.resume.record import Record

log = logging.getLogger(__name__)

FOLLOWER_CATCH_UP_S = 2.0  # a follower waits this long for messages a client saw that have not reached it yet

Restart = Callable[[Journal, GenerationRequest, "dict[str, Any] | None"], None]
"""How a door goes on with a generation another replica began: its journal, the request (the prompt and the tokens
generated so far as a continuation), and the door's batching settings from the record."""

OUTCOMES = {"session": "ambiguous", "resume_token": "refused", "after_seq": "invalid"}


def outcome(refused: RequestError) -> str:
    """The telemetry outcome of a refused ``resume``, by the field at fault."""
    return OUTCOMES.get(refused.param or "", "not_found")


def held_elsewhere(gen_id: str) -> RequestError:
    return RequestError(
        ErrorCode.INVALID_REQUEST,
        f"generation {gen_id!r} is held by a connection that is still open; only a resume with the resume_token of "
        "its started message can take it over",
        "resume_token",
        id=gen_id,
    )


class Resumes:
    """The resumable generations of this process (``registry``) and, with ``shared``, of every replica."""

    def __init__(self, registry: Registry, shared: SharedJournal | None = None) -> None:
        self.registry = registry
        self.shared = shared
        registry.shared = shared
        self.restart: Restart | None = None  # set by the door that delivers journals
        if shared is not None:
            shared.on_takeover = self.take_over

    @classmethod
    def of(cls, window: float, budget_bytes: int, journal_url: str | None = None, lease_s: float = 3.0) -> Resumes:
        """Kept in this process, or (``journal_url``, redis://...) shared by every replica in Redis."""
        registry = Registry(window, budget_bytes)
        if not journal_url:
            return cls(registry)
        from tokenwire.server.resume.redis_journal import RedisJournal

        return cls(registry, RedisJournal(journal_url, registry, lease_s))

    # -- a generation starts
    def track(
        self, journal: Journal, model: str, tenant: str, params: SamplingParams, batch: Any | None = None
    ) -> None:
        """``journal``'s generation starts here: with a shared journal, copy it out, with what another replica needs
        to resume it or go on with it (``batch``: the door's batching settings, a dataclass, or None)."""
        if self.shared is not None:
            record = Record.of(
                journal.session, journal.gen_id, journal.owner, journal.token_digest, model, tenant, params, batch
            )
            self.shared.track(journal, record)

    # -- resume
    async def find(
        self,
        holder: Holder,
        owner: str | None,
        gen_id: str,
        session: str | None,
        token: str | None,
        after_seq: int,
    ) -> Journal:
        """The journal ``holder`` may deliver from ``after_seq + 1`` for a ``resume``. RequestError when there is
        none (``id``), several (``session``), it has no message ``after_seq`` (``after_seq``), or its connection is
        still open and ``token`` is not its resume token (``resume_token``)."""
        try:
            journal = self.registry.find(owner, gen_id, session)
        except RequestError as refused:
            if self.shared is None or refused.param == "session":
                raise
            journal = await self._follow(owner, gen_id, session, token)  # another replica's, or one that is gone
        if journal.follower and after_seq > journal.last_seq:  # the client saw messages still on their way
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(journal.wait_beyond(after_seq - 1), FOLLOWER_CATCH_UP_S)
        if after_seq > journal.last_seq:
            raise RequestError(
                ErrorCode.INVALID_REQUEST,
                f"after_seq {after_seq} is past the last message of {gen_id!r} so far (seq {journal.last_seq})",
                "after_seq",
                id=gen_id,
            )
        if not journal.may_take_over(holder, token):
            raise held_elsewhere(gen_id)
        return journal

    async def _follow(self, owner: str | None, gen_id: str, session: str | None, token: str | None) -> Journal:
        """A generation of another replica's, from the shared journal, as a local follower journal."""
        shared = self.shared
        assert shared is not None
        try:
            remote = await shared.lookup(owner, gen_id, session)
        except RequestError:
            raise
        except Exception as exc:
            log.warning("could not read the shared journal: %s", exc)
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"generation {gen_id!r} could not be looked up in the shared journal: {exc}",
                "id",
                id=gen_id,
            ) from exc
        held = remote.held and remote.replica is not None  # a connection on its replica may still be open
        if not may_take_over(held, token, remote.record.token_digest):
            raise held_elsewhere(gen_id)
        journal = await shared.follow(remote)
        with contextlib.suppress(KeyError):
            self.registry.add(journal)
        return journal

    async def hand_over(self, journal: Journal) -> None:
        """Whoever delivers ``journal`` now stops sending it (it goes on, for its new holder)."""
        if journal.holder is not None:
            await journal.holder.hand_over(journal.gen_id, journal)

    async def cancel(self, journal: Journal) -> bool:
        """A follower's generation runs on another replica: ask it to stop there (True). False for one that runs
        here (the caller aborts it in its engine)."""
        if not journal.follower or self.shared is None:
            return False
        await self.shared.cancel(journal)
        return True

    # -- abandon
    def let_go(self, journal: Journal, holder: Holder, abort: bool) -> asyncio.Task[None] | None:
        """``holder``'s socket is gone: leave ``journal`` orphaned (paused, resumable for the window) or, with
        ``abort`` or resume off, end it: then its producer task, cancelled, for the caller to wait for."""
        if journal.holder is not holder:  # resumed on another connection meanwhile: it is theirs now
            return None
        if journal.finished:
            self.registry.detach(journal)
            return None
        if not (self.registry.detach(journal) or abort):
            return None
        self.registry.forget(journal)
        if journal.task is None:
            return None
        journal.task.cancel()
        return journal.task

    def stop(self, journal: Journal) -> bool:
        """The server stops: nothing is resumable here any more. True when another replica goes on with the
        generation where its client resumes (a shared journal), so its client is not told it ended."""
        handed = self.shared is not None and self.shared.hand_off(journal)
        self.registry.forget(journal)
        return handed

    def abandon(self, orphans_only: bool = False) -> list[asyncio.Task[None]]:
        """Forget resumable generations (``orphans_only``: those with no connection), handing them to another
        replica where there is a shared journal; returns the tasks of those still running, for the caller to stop."""
        tasks = []
        for journal in self.registry.journals():
            if orphans_only and journal.holder is not None:
                continue
            self.stop(journal)
            if journal.task is not None and not journal.task.done():
                tasks.append(journal.task)
        return tasks

    def expire(self) -> None:
        """Forget generations idle past the resume window (or over the memory budget); abort the orphans among
        them, which nobody resumed in time."""
        for journal in self.registry.sweep():
            log.debug("generation %s was not resumed in time: aborted", journal.engine_id)
            if journal.task is not None:
                journal.task.cancel()

    # -- take-over
    def take_over(self, journal: Journal, record: Record) -> None:
        """The replica that ran this generation is gone: go on with it here, from the tokens in its journal, each
        next message with the next seq (the door's ``restart`` makes it)."""
        generated = tuple(t for entry in journal.entries for t in entry.ids)
        request = GenerationRequest(
            journal.engine_id,
            record.sampling(),
            continuation=Continuation(record.prompt_ids, generated),
            tenant=record.tenant,
            connection=record.session,
        )
        if self.restart is None:
            log.error("generation %s cannot go on here: no door restarts generations", journal.engine_id)
            return
        self.restart(journal, request, record.batch)
