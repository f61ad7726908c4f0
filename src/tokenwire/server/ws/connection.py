"""One WebSocket connection: read frames, start or resume generations, send their messages in order.

A generation's messages are produced into its journal by its own task (generation.py); the connection holds
the journal and a *pump* task that sends what the journal holds, from a cursor, marking each message written
(the producer's flow control reads that: generation.py). All writes go through one lock, so messages of
different generations interleave whole. When the connection goes away, its running generations are orphaned,
not stopped: they are paused and kept for the resume window, and a ``resume`` on a new connection takes them
over from the last ``seq`` the client saw, and they go on. A client that closes normally (1000) is done with
them, so they are aborted then, as they are when resume is off (window 0).

A client that reads slowly gets fewer, larger messages, and its generations pause when it falls behind. One that
stops reading blocks its own writes; after ``slow_consumer_timeout`` the connection is closed (its generations
are orphaned, so the client can still resume them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.engine.interface import Engine, GenerationRequest
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.requests.errors import (
    GOING_AWAY,
    INTERNAL_ERROR_CLOSURE,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    ErrorCode,
    RequestError,
)
from tokenwire.server.resume.journal import Journal
from tokenwire.server.resume.service import Resumes, outcome
from tokenwire.server.settings import ServerSettings
from tokenwire.server.streaming.backlog import Backlog
from tokenwire.server.streaming.event_socket import Sender, SlowConsumer, read_frames
from tokenwire.server.telemetry import Telemetry
from tokenwire.server.ws import messages
from tokenwire.server.ws.generation import Producer
from tokenwire.server.ws.protocol import (
    Cancel,
    ClientMessage,
    Generate,
    Ping,
    Pong,
    Resume,
    parse_message,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    """A generation this connection delivers: its journal and the task sending it."""

    journal: Journal
    pump: asyncio.Task[None]


class Connection:
    def __init__(
        self,
        ws: WebSocket,
        engine: Engine,
        settings: ServerSettings,
        telemetry: Telemetry,
        resumes: Resumes,
        owner: str | None = None,
        accepting: Callable[[], bool] = lambda: True,
        key_limits: KeyLimits | None = None,
    ) -> None:
        self.ws = ws
        self.telemetry = telemetry
        self.engine = engine
        self.settings = settings
        self.resumes = resumes
        self.owner = owner  # who may resume what this connection starts (see auth.owner_of)
        self.accepting = accepting  # False while the server drains: new generations are refused
        self.key_limits = key_limits or KeyLimits()  # per API key, over every connection (limits.py)
        self.session = secrets.token_hex(6)
        self.connected_at = time.time()
        self.tokens_sent = 0
        # one writer at a time; a client that reads nothing is dropped here (_drop_slow_consumer), not by the sender
        self.sender = Sender(ws, telemetry, settings.slow_consumer_timeout, "protocol", close_when_stuck=False)
        self.backlog = Backlog.of(ws.scope)
        self._held: dict[str, _Held] = {}
        self._auto_ids = itertools.count(1)
        self._closing = False
        self._closer: asyncio.Task[None] | None = None

    @property
    def messages_sent(self) -> int:
        return self.sender.sent

    @property
    def running_generations(self) -> int:
        return len(self._held)

    @property
    def is_open(self) -> bool:
        """False once the connection is closing: its generations are then resumable by id alone."""
        return not self._closing

    async def run(self, subprotocol: str | None = None) -> None:
        await self.ws.accept(subprotocol=subprotocol)
        heartbeat: asyncio.Task[None] | None = None
        close_code: int | None = None
        reply_code = 1000
        try:
            await self.send(
                messages.hello(
                    self.session,
                    self.engine.model_name,
                    {**self.settings.limits.as_dict(), "context_tokens": self.engine.max_context},
                    self.settings.heartbeat_interval,
                    self.engine.stats().backend,
                )
            )
            if self.settings.heartbeat_interval > 0:
                heartbeat = asyncio.create_task(self._heartbeat())
            close_code = await read_frames(self.ws, self._handle)
        except WebSocketDisconnect as exc:
            close_code = exc.code
        except Exception:  # a bug: say so with 1011 (not 1000, after which clients do not reconnect)
            log.exception("connection %s failed", self.session)
            reply_code = INTERNAL_ERROR_CLOSURE
        finally:
            self._closing = True
            if heartbeat is not None:
                heartbeat.cancel()
            # A client that closed normally is done with its generations; any other loss may be resumed.
            await self._let_go(abort=close_code == NORMAL_CLOSURE)
            await self._close(reply_code)

    async def shutdown(self, deliver_timeout: float = 2.0) -> None:
        """The server stops: abort the running generations, send each client what was generated for it (for at
        most ``deliver_timeout`` seconds), end every generation that has no last message yet with
        ``shutting_down``, then close with 1001."""
        held = dict(self._held)
        producers = [h.journal.task for h in held.values() if not h.journal.finished and h.journal.task]
        # nothing is resumable on a server that stops; with a shared journal, another replica goes on with them
        handed = {g for g, h in held.items() if self.resumes.stop(h.journal)}
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        pumps = [h.pump for h in held.values()]
        if pumps:  # every journal is closed now: the pumps send what is left and stop
            _, late = await asyncio.wait(pumps, timeout=deliver_timeout)
            for pump in late:
                pump.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._held = {}
        for gen_id, h in held.items():
            if h.journal.holder not in (self, None) or (h.journal.entries and h.journal.entries[-1].final):
                continue  # resumed elsewhere, or ended with complete or error
            if gen_id in handed:
                continue  # not over: a resume on another replica goes on with it
            self.telemetry.error(ErrorCode.SHUTTING_DOWN.value)
            await self._send_quietly(
                messages.error(
                    ErrorCode.SHUTTING_DOWN,
                    "the server is shutting down; try again later",
                    gen_id,
                    seq=h.journal.last_seq + 1,
                )
            )
        self._closing = True
        await self._close(GOING_AWAY)

    async def notify(self, notice: dict[str, Any]) -> bool:
        """Send a ``notice`` (an operator's broadcast, the drain); False if the client could not take it."""
        if self._closing:
            return False
        try:
            await self.send(notice)
        except (WebSocketDisconnect, OSError):
            return False
        return True

    async def _let_go(self, abort: bool) -> None:
        """The socket is gone: stop delivering every held generation; abort them (``abort`` or resume off) or
        leave them orphaned, for a resume."""
        held, self._held = self._held, {}
        for h in held.values():
            h.pump.cancel()
        await asyncio.gather(*(h.pump for h in held.values()), return_exceptions=True)
        producers = [task for h in held.values() if (task := self.resumes.let_go(h.journal, self, abort))]
        await asyncio.gather(*producers, return_exceptions=True)

    async def _close(self, code: int) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)

    # -- reading
    async def _handle(self, data: str | bytes) -> None:
        """One client frame: parsed and dispatched; a bad one is answered with an error, the connection goes on."""
        msg: ClientMessage | None = None
        try:
            msg = parse_message(data, self.settings.limits)
            await self._dispatch(msg)
        except RequestError as err:
            await self.send_error(err.code, err.message, err.id, err.param)
        except (WebSocketDisconnect, OSError):
            raise
        except Exception:  # a bug in handling one message: report it, keep the connection and its generations
            log.exception("connection %s could not handle a message (%s)", self.session, type(msg).__name__)
            gen_id = getattr(msg, "id", None)
            await self.send_error(ErrorCode.INTERNAL_ERROR, "the server failed to handle this message", gen_id)

    async def _dispatch(self, msg: Generate | Cancel | Ping | Pong | Resume) -> None:
        if isinstance(msg, Generate):
            await self._start_generation(msg)
        elif isinstance(msg, Cancel):
            held = self._held.get(msg.id)
            if held is None:
                await self.send_error(ErrorCode.NOT_FOUND, f"no running generation with id {msg.id!r}", msg.id, "id")
            elif await self.resumes.cancel(held.journal):  # another replica runs it
                pass
            elif not held.journal.finished:  # a finished one is being delivered: its last message is on the way
                self.engine.abort(held.journal.engine_id)
        elif isinstance(msg, Ping):
            await self.send(messages.pong(msg.ts))
        elif isinstance(msg, Resume):
            await self._resume(msg)

    async def _refused_room(self, gen_id: str) -> bool:
        """Whether ``gen_id`` cannot run here (a duplicate id, or the connection's cap); sends the error if so."""
        cap = self.settings.limits.max_generations_per_connection
        if gen_id in self._held:
            msg = f"a generation with id {gen_id!r} is already running"
            await self.send_error(ErrorCode.DUPLICATE_ID, msg, gen_id, "id")
        elif len(self._held) >= cap:
            msg = f"this connection already runs {cap} generations; wait for one to end"
            await self.send_error(ErrorCode.RATE_LIMITED, msg, gen_id)
        else:
            return False
        return True

    async def _start_generation(self, msg: Generate) -> None:
        gen_id = msg.id if msg.id is not None else f"gen-{next(self._auto_ids)}"
        if not self.accepting():
            message = "the server is shutting down and starts no new generations; reconnect and try again shortly"
            await self.send_error(ErrorCode.SHUTTING_DOWN, message, gen_id)
            return
        if await self._refused_room(gen_id):
            return
        if msg.model is not None and msg.model not in (self.engine.model_name, *self.engine.model_aliases):
            message = f"the model {msg.model!r} does not exist; this server serves {self.engine.model_name!r}"
            await self.send_error(ErrorCode.MODEL_NOT_FOUND, message, gen_id, "model")
            return
        tenant = self.owner or ""
        try:
            self.key_limits.acquire(tenant)
        except RequestError as err:
            await self.send_error(err.code, err.message, gen_id, retry_after=err.retry_after)
            return
        engine_id = f"{self.session}:{gen_id}"
        journal = Journal(self.session, gen_id, self.owner, engine_id)
        try:
            self.resumes.registry.add(journal)
        except KeyError:  # this connection's earlier generation of that id runs on, resumed elsewhere
            self.key_limits.release(tenant, 0)
            await self.send_error(
                ErrorCode.DUPLICATE_ID,
                f"a generation with id {gen_id!r} started here still runs (resumed on another connection)",
                gen_id,
                "id",
            )
            return
        self.resumes.track(journal, self.engine.model_name, tenant, msg.params, msg.batch)
        request = GenerationRequest(
            request_id=engine_id,
            params=msg.params,
            prompt=msg.prompt,
            messages=msg.messages,
            raw=msg.raw,
            truncate=msg.truncate,
            tenant=tenant,
            connection=self.session,
        )
        producer = Producer(self.engine, journal, self.resumes.registry, self.telemetry, msg.batch, self.settings.flow)
        task = asyncio.create_task(producer.run(request, self.session))
        # A done callback, not the producer's own finally: a task cancelled before it ran never runs that.
        task.add_done_callback(lambda _: self.key_limits.release(tenant, producer.used_tokens))
        journal.produced_by(task)
        self._hold(journal, 0)

    async def _resume(self, msg: Resume) -> None:
        try:
            journal = await self.resumes.find(self, self.owner, msg.id, msg.session, msg.resume_token, msg.after_seq)
        except RequestError as refused:
            self.telemetry.resume(outcome(refused))
            await self.send_error(refused.code, refused.message, msg.id, refused.param)
            return
        mine = self._held.get(msg.id)
        if (mine is None or mine.journal is not journal) and await self._refused_room(msg.id):
            return
        await self.resumes.hand_over(journal)  # the old socket may be half-open: take the generation over
        self.telemetry.resume("resumed")
        await self.send(messages.resumed(msg.id, msg.after_seq, journal.last_seq, not journal.finished))
        self._hold(journal, msg.after_seq + 1)

    async def hand_over(self, gen_id: str, journal: Journal) -> None:
        """Another connection resumed this generation: stop sending it here, without stopping it."""
        held = self._held.get(gen_id)
        if held is None or held.journal is not journal:
            return
        del self._held[gen_id]
        held.pump.cancel()
        await asyncio.wait({held.pump})  # unlike awaiting it, this does not raise the pump's cancellation here

    def _hold(self, journal: Journal, first_seq: int) -> None:
        self.resumes.registry.attach(journal, self, first_seq)
        self._held[journal.gen_id] = _Held(journal, asyncio.create_task(self._pump(journal, first_seq)))

    # -- delivering one generation
    async def _pump(self, journal: Journal, seq: int) -> None:
        """Send the journal's messages from ``seq`` on, as they come, until its last."""
        gen_id = journal.gen_id
        try:
            while True:
                await journal.wait_beyond(seq - 1)
                entries = journal.entries
                while seq < len(entries):
                    entry = entries[seq]
                    if entry.final:  # the client may reuse the id as soon as it sees the last message
                        self._release(gen_id, journal)
                    else:
                        await self._room()
                    await self._send_encoded(entry.data)
                    self.tokens_sent += entry.tokens
                    journal.mark_sent(seq)
                    seq += 1
                if journal.finished:
                    self._release(gen_id, journal)
                    return
        except SlowConsumer:
            if self._closer is None:
                self._closer = asyncio.create_task(self._drop_slow_consumer())
        except (WebSocketDisconnect, OSError):
            pass  # the read loop sees the disconnect and lets the generation go

    async def _room(self) -> None:
        """Wait until the socket holds fewer unread bytes than the flow policy allows (backlog.py); a reader that
        takes nothing at all for ``slow_consumer_timeout`` is a slow consumer (one that reads, however slowly, is
        not)."""
        if not await self.backlog.room(self.settings.flow.max_socket_bytes, self.settings.slow_consumer_timeout):
            log.warning("closing connection %s: the client does not read", self.session)
            raise SlowConsumer()

    async def _drop_slow_consumer(self) -> None:
        """The client stopped reading: orphan its generations now (it may resume them on a new connection), then
        close. The close handshake needs the client to read, so nothing waits for it."""
        self._closing = True
        await self._let_go(abort=False)
        await self._close(POLICY_VIOLATION)

    def _release(self, gen_id: str, journal: Journal) -> None:
        held = self._held.get(gen_id)
        if held is not None and held.journal is journal:
            del self._held[gen_id]
            journal.release(self)

    # -- writing
    async def send_error(
        self,
        code: ErrorCode,
        content: str,
        gen_id: str | None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.telemetry.error(code.value)
        await self.send(messages.error(code, content, gen_id, param, retry_after=retry_after))

    async def send(self, message: dict[str, Any]) -> None:
        await self._send_encoded(messages.encode(message))

    async def _send_encoded(self, data: str) -> None:
        await self.sender.send(data)

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        if self._closing:
            return
        with contextlib.suppress(WebSocketDisconnect, OSError):
            await self.send(message)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.send(messages.ping(time.time()))
            except (WebSocketDisconnect, OSError):
                return
