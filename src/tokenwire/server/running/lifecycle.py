"""The server's life: load the model, serve, drain, stop; and what every route shares meanwhile (:class:`ServerState`).

Load: the port is bound at once; the model loads in the background, during which ``/health`` answers 200 and
``/ready`` 503. A model that fails to load stops the server with a clear log line (``on_fatal``); so does an engine
that dies or hangs later (:meth:`ServerState.watch_engine`), so that its supervisor restarts the process.

Drain (SIGTERM, or Ctrl-C, once): ``/ready`` answers 503 at once, every WebSocket hears a ``notice``, and new work
is refused (a new WebSocket gets ``shutting_down`` and close 1001, a new generation on an open one the error
``shutting_down``, an HTTP request 503 with Retry-After). Running generations have ``drain_timeout`` seconds to end
normally; then those left end with ``shutting_down`` and every socket closes with 1001. A second signal cuts the
wait short. Generations whose connection had dropped (paused, kept for resume) are let go at the start: their
clients could not come back to a server that refuses them. With a shared journal (resume/redis_journal.py) they,
and those still running when the wait ends, are handed off instead: their clients get no ``shutting_down``, and the
replica they resume on goes on with them (a rolling update loses no answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from tokenwire.engine.interface import Engine
from tokenwire.server.admission.capacity import ConnectionGate, FdWatch, IpGate
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.realtime.connection import RealtimeConnection
from tokenwire.server.responses.service import Responses
from tokenwire.server.responses.websocket import ResponsesConnection
from tokenwire.server.resume.service import Resumes
from tokenwire.server.settings import ServerSettings
from tokenwire.server.telemetry import Telemetry
from tokenwire.server.ws import messages
from tokenwire.server.ws.connection import Connection
from tokenwire.server.ws.generation import restarter

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05


class EventSocket(Protocol):
    """An OpenAI-style WebSocket (Realtime, Responses) as the drain sees it."""

    def stop_accepting(self) -> None: ...

    async def shutdown(self, deliver_timeout: float = 2.0) -> None: ...


class Door(Protocol):
    """A door other than the WebSocket protocol's (the HTTP API) as the drain sees it."""

    def stop_accepting(self) -> None: ...

    @property
    def in_flight(self) -> int: ...

    async def drain(self) -> None:
        """End what still runs (``shutting_down``)."""


class ServerState:
    """What routes share: the engine, settings, open connections, resumable generations, and the life cycle."""

    def __init__(
        self,
        engine: Engine,
        settings: ServerSettings,
        on_fatal: Callable[[], None] | None,
        public_url: str | None = None,
        drain_timeout: float = 25.0,
        hosted: bool = False,
    ) -> None:
        # hosted: served by another framework's server (a Ray Serve replica), not our uvicorn: the lifespan waits
        # for the model before traffic comes, and drains when it ends (nobody drains before it)
        self.hosted = hosted
        self.public_url = public_url
        self.engine = engine
        self.settings = settings
        self.connections: set[Connection] = set()
        self.realtime_connections: set[RealtimeConnection] = set()
        self.responses_connections: set[ResponsesConnection] = set()
        self.resumes = Resumes.of(
            settings.resume_window, settings.resume_buffer_bytes, settings.journal_url, settings.journal_lease
        )
        self.generations = self.resumes.registry
        if self.resumes.shared is not None:
            self.resumes.shared.on_cancel = lambda journal: engine.abort(journal.engine_id)
        self.telemetry: Telemetry | None = None  # the app's (create_app sets it)
        self.on_fatal = on_fatal
        self.load_error: str | None = None
        self.engine_error: str | None = None  # the engine stopped after it had loaded
        self.draining = False
        self.drain_timeout = drain_timeout
        self.load_task: asyncio.Task[None] | None = None
        self.doors: list[Door] = []  # the HTTP API
        self.responses: Responses | None = None  # the Responses API (HTTP and WebSocket; create_app sets it)
        self.gate = ConnectionGate(settings.max_connections)
        self.per_ip = IpGate(settings.max_connections_per_ip)
        self.key_limits = KeyLimits(settings.max_generations_per_key, settings.rate_limit_tokens_per_minute)

    def use(self, telemetry: Telemetry) -> None:
        """The app's telemetry: the WebSocket door's generations report to it, those taken over included."""
        self.telemetry = telemetry
        self.resumes.restart = restarter(self.engine, self.generations, telemetry, self.settings.flow)

    # -- what every route asks
    @property
    def accepting(self) -> bool:
        """New work is welcome: not draining, and the engine runs."""
        return not self.draining and self.engine.ready and self.engine_error is None

    def event_sockets(self) -> list[EventSocket]:
        """The OpenAI-style WebSockets (Realtime, Responses) open now."""
        return [*self.realtime_connections, *self.responses_connections]

    def in_flight(self) -> int:
        """Generations with a client waiting for them, on every door."""
        ws = sum(c.running_generations for c in list(self.connections))
        rt = sum(c.running_responses for c in list(self.realtime_connections))  # Responses: a door (self.doors)
        return ws + rt + sum(d.in_flight for d in self.doors)

    async def broadcast(self, notice: dict[str, Any]) -> int:
        """Send ``notice`` to every open WebSocket of the protocol; returns to how many it went."""
        sent = await asyncio.gather(*(c.notify(notice) for c in list(self.connections)), return_exceptions=True)
        return sum(1 for ok in sent if ok is True)

    # -- draining
    async def drain(self, force: Callable[[], bool] = lambda: False) -> None:
        """See the module docstring. ``force`` turns true on a second signal: stop waiting."""
        if self.draining:
            return
        self.draining = True
        started = time.monotonic()
        for door in self.doors:
            door.stop_accepting()
        for conn in self.event_sockets():
            conn.stop_accepting()
        for task in self.abandon_generations(orphans_only=True):
            task.cancel()
        waiting = self.in_flight()
        log.warning(
            "draining: %d generation(s) running get up to %.0f s to finish; new work is refused (a second signal "
            "stops at once)",
            waiting,
            self.drain_timeout,
        )
        notice = messages.notice(
            "the server is restarting: answers running now may finish, new ones are refused; reconnect shortly",
            level="warning",
            code="draining",
            drain_s=self.drain_timeout,
        )
        await self.broadcast(notice)
        deadline = started + self.drain_timeout
        while self.in_flight() and time.monotonic() < deadline and not force():
            await asyncio.sleep(DRAIN_POLL_S)
        left = self.in_flight()
        if left:
            fate = "go on where their clients resume" if self.resumes.shared else "end with shutting_down"
            log.warning("drain over after %.1f s: %d generation(s) %s", time.monotonic() - started, left, fate)
        else:
            log.info("drained in %.1f s: every running generation finished", time.monotonic() - started)
        await self.close_all()

    async def close_all(self) -> None:
        """End what still runs with ``shutting_down`` and close every socket with 1001."""
        self.draining = True
        closing: list[Awaitable[None]] = [c.shutdown() for c in list(self.connections)]
        closing += [c.shutdown() for c in self.event_sockets()]
        closing += [door.drain() for door in self.doors]
        await asyncio.gather(*closing, return_exceptions=True)
        for task in self.abandon_generations():  # orphans: nobody is left to tell
            task.cancel()

    def abandon_generations(self, orphans_only: bool = False) -> list[asyncio.Task[None]]:
        """Forget resumable generations (``orphans_only``: those with no connection); returns the tasks of those
        still running, for the caller to stop."""
        return self.resumes.abandon(orphans_only)

    async def sweep_generations(self) -> None:
        """Forever: forget generations idle past the resume window (or the memory budget); abort orphans."""
        window = self.generations.window
        if window <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, max(0.05, window / 4)))
            self.resumes.expire()

    # -- loading and watching
    async def load(self) -> None:
        started = time.monotonic()
        if self.resumes.shared is not None:
            try:
                await self.resumes.shared.start()
            except Exception as exc:
                self.load_error = str(exc)
                log.error("%s; stopping (start Redis, or serve with --journal memory)", exc)
                if self.on_fatal is not None:
                    self.on_fatal()
                return
        try:
            await self.engine.start()
            # The model and libraries are millions of long-lived objects: take them out of the garbage
            # collector's scans, so that a full collection cannot stall the event loop for tens of ms.
            gc.collect()
            gc.freeze()
            if self.public_url:
                url, ws = self.public_url, self.public_url.replace("http", "ws", 1)
                log.info(
                    "ready in %.1f s: %s (%s engine) is served at %s (chat page), %s/ws (WebSocket), "
                    "%s/v1 (OpenAI API), %s/dashboard",
                    time.monotonic() - started,
                    self.engine.model_name,
                    self.engine.stats().backend,
                    url + "/",
                    ws,
                    url,
                    url,
                )
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        await self.watch_engine()

    async def watch_engine(self, interval: float = 0.5) -> None:
        """Once loaded: when the engine stops being ready without a drain (its loop died or hung), say so and stop
        the process (``on_fatal``), so that its supervisor starts a fresh one."""
        while not self.draining:
            await asyncio.sleep(interval)
            problem = self.engine.health()
            if problem is None and self.engine.ready:
                continue
            if self.draining:
                return
            self.engine_error = str(problem or "the engine stopped")
            log.error("the engine failed: %s; stopping the server so that it can be restarted", self.engine_error)
            if self.on_fatal is not None:
                self.on_fatal()
            return


@contextlib.asynccontextmanager
async def lifespan(state: ServerState) -> AsyncIterator[None]:
    """The ASGI lifespan: load and watch the engine, sweep resumable generations, watch file descriptors; at
    the end stop them all and the engine."""
    state.load_task = asyncio.create_task(state.load())
    sweeper = asyncio.create_task(state.sweep_generations())
    watch = asyncio.create_task(FdWatch().run())
    if state.hosted:  # take traffic once the model is loaded (or failed)
        while not state.engine.ready and state.load_error is None and not state.load_task.done():
            await asyncio.sleep(0.1)
    try:
        yield
        if state.hosted and not state.draining:
            await state.drain()
    finally:
        for task in (state.load_task, sweeper, watch, *state.abandon_generations()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if state.resumes.shared is not None:
            await state.resumes.shared.close()
        await state.engine.shutdown()
