"""The ASGI application: routes, and the engine's life cycle.

The port is bound at once; the model loads in the background, during which ``/health`` answers 200 and
``/ready`` 503. A model that fails to load stops the server with a clear log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from tokenwire.engine.interface import Engine, ErrorCode
from tokenwire.metrics import Session
from tokenwire.server import messages
from tokenwire.server import realtime_protocol as rt
from tokenwire.server.auth import AuthPolicy, bearer_token, origin_allowed, websocket_key
from tokenwire.server.backlog import ExposeTransport
from tokenwire.server.capacity import ConnectionGate, FdWatch, RequestCap
from tokenwire.server.http_guard import RequestGuard
from tokenwire.server.journal import Registry, owner_of
from tokenwire.server.openai_api import OpenAIRoutes
from tokenwire.server.realtime import RealtimeConnection
from tokenwire.server.telemetry import Telemetry, public_ref
from tokenwire.server.websocket import Connection, ConnectionSettings

log = logging.getLogger(__name__)

TRY_AGAIN_LATER = 1013
FULL = "the server holds as many connections as it may (--max-connections); try again later"


class ServerState:
    """What routes share: the engine, settings, open connections, and the load task."""

    def __init__(
        self,
        engine: Engine,
        settings: ConnectionSettings,
        on_fatal: Callable[[], None] | None,
        public_url: str | None = None,
    ) -> None:
        self.public_url = public_url
        self.engine = engine
        self.settings = settings
        self.connections: set[Connection] = set()
        self.realtime_connections: set[RealtimeConnection] = set()
        self.generations = Registry(settings.resume_window, settings.resume_buffer_bytes)
        self.on_fatal = on_fatal
        self.load_error: str | None = None
        self.draining = False
        self.load_task: asyncio.Task[None] | None = None
        self.drainers: list[Callable[[], Awaitable[None]]] = []  # other doors' drains (the HTTP API's)
        self.gate = ConnectionGate(settings.max_connections)

    async def drain(self) -> None:
        """Tell every client that the server stops (``shutting_down``, close 1001); /ready answers 503 from now."""
        self.draining = True
        closing: list[Awaitable[None]] = [c.shutdown() for c in list(self.connections)]
        closing += [c.shutdown() for c in list(self.realtime_connections)]
        closing += [drain() for drain in self.drainers]
        await asyncio.gather(*closing, return_exceptions=True)
        for task in self.abandon_generations():  # orphans: nobody is left to tell
            task.cancel()

    def abandon_generations(self) -> list[asyncio.Task[None]]:
        """Forget every resumable generation; returns the tasks of those still running, for the caller to stop."""
        tasks = []
        for journal in self.generations.journals():
            self.generations.forget(journal)
            if journal.task is not None and not journal.task.done():
                tasks.append(journal.task)
        return tasks

    async def sweep_generations(self) -> None:
        """Forever: forget generations idle past the resume window (or the memory budget); abort orphans."""
        window = self.generations.window
        if window <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, max(0.05, window / 4)))
            for journal in self.generations.sweep():
                log.debug("generation %s was not resumed in time: aborted", journal.engine_id)
                if journal.task is not None:
                    journal.task.cancel()

    async def load(self) -> None:
        started = time.monotonic()
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


def _public(session: Session) -> dict[str, object]:
    """A session of the report, its ids replaced by digests (public_ref)."""
    return {
        **session.as_dict(),
        "session_id": public_ref(session.session_id),
        "connection": public_ref(session.connection),
    }


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug in a route: an OpenAI-shaped 500 (the exception is logged by the server), never a plain-text page."""
    error = {"message": "the server failed to handle this request", "type": "server_error", "param": None}
    return JSONResponse({"error": {**error, "code": "internal_error"}}, status_code=500)


def create_app(
    engine: Engine,
    settings: ConnectionSettings | None = None,
    on_fatal: Callable[[], None] | None = None,
    sse_keepalive_interval: float = 15.0,
    public_url: str | None = None,
    auth: AuthPolicy | None = None,
    max_body_bytes: int | None = None,
) -> Starlette:
    """The app. ``max_body_bytes`` caps HTTP request bodies (None: the WebSocket frame limit)."""
    policy = auth or AuthPolicy()
    state = ServerState(engine, settings or ConnectionSettings(), on_fatal, public_url)
    telemetry = Telemetry(
        engine.stats,
        lambda: len(state.connections) + len(state.realtime_connections),
        lambda: (state.generations.orphaned, state.generations.nbytes),
    )
    api = OpenAIRoutes(engine, state.settings.limits, sse_keepalive_interval, telemetry)
    state.drainers.append(api.drain)
    web = resources.files("tokenwire.web")
    dashboard_page = web.joinpath("dashboard.html").read_text(encoding="utf-8")
    tutorial_page = web.joinpath("tutorial.html").read_text(encoding="utf-8")
    chat_page = web.joinpath("index.html").read_text(encoding="utf-8")

    async def tutorial(request: Request) -> Response:
        return HTMLResponse(tutorial_page)

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(dashboard_page)

    async def metrics(request: Request) -> Response:
        return Response(telemetry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def timeline(request: Request) -> Response:
        try:
            window = min(3600, max(10, int(request.query_params.get("window", "300"))))
        except ValueError:
            window = 300
        es = state.engine.stats()
        return JSONResponse(
            {
                "series": telemetry.timeline.series(window=window),
                "now": {"running": es.running, "waiting": es.waiting, "connections": len(state.connections)},
            }
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(chat_page)

    def websocket_refusal(ws: WebSocket) -> tuple[str | None, str | None, str | None]:
        """(API key, subprotocol to accept, why the upgrade is refused or None) for a WebSocket request."""
        subprotocols = ws.scope.get("subprotocols") or []
        key, subprotocol = websocket_key(ws.headers, ws.query_params, subprotocols)
        problem = None
        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), policy):
            problem = "this page's origin may not open a WebSocket here (see --allowed-origins)"
        elif not policy.key_ok(key):
            problem = "an API key is required: send it as the subprotocol bearer.KEY, ?api_key=KEY or a Bearer header"
        return key, subprotocol, problem

    async def refuse(ws: WebSocket, subprotocol: str | None, message: dict[str, object], code: int = 1008) -> None:
        """Accept, so that the client can read why, then close with ``code`` (1008 policy, 1013 try again later)."""
        await ws.accept(subprotocol=subprotocol)
        await ws.send_text(messages.encode(message))
        await ws.close(code)

    async def take_place(ws: WebSocket, subprotocol: str | None, full: dict[str, object]) -> bool:
        """A place under --max-connections (the caller leaves it when done), or ``full`` sent and close 1013."""
        if state.gate.enter():
            return True
        telemetry.error(ErrorCode.OVERLOADED.value)
        await refuse(ws, subprotocol, full, TRY_AGAIN_LATER)
        return False

    async def websocket(ws: WebSocket) -> None:
        key, subprotocol, problem = websocket_refusal(ws)
        if problem is not None:
            telemetry.error(ErrorCode.UNAUTHORIZED.value)
            await refuse(ws, subprotocol, messages.error(ErrorCode.UNAUTHORIZED, problem))
            return
        if not await take_place(ws, subprotocol, messages.error(ErrorCode.OVERLOADED, FULL)):
            return
        conn = Connection(
            ws, state.engine, state.settings, telemetry, state.generations, owner_of(key if policy.enabled else None)
        )
        state.connections.add(conn)
        try:
            await conn.run(subprotocol)
        finally:
            state.connections.discard(conn)
            state.gate.leave()

    async def realtime(ws: WebSocket) -> None:
        _, subprotocol, problem = websocket_refusal(ws)
        model = ws.query_params.get("model")
        if problem is None and model is not None and model != state.engine.model_name:
            problem = f"the model {model!r} does not exist; this server serves {state.engine.model_name!r}"
            code = "model_not_found"
        else:
            code = ErrorCode.UNAUTHORIZED.value
        if problem is None and not state.engine.ready:
            problem, code = "the model is still loading; try again shortly", ErrorCode.OVERLOADED.value
        if problem is not None:
            telemetry.error(code)
            await refuse(ws, subprotocol, rt.error_event(rt.RealtimeError(problem, code), None))
            return
        if not await take_place(
            ws, subprotocol, rt.error_event(rt.RealtimeError(FULL, ErrorCode.OVERLOADED.value), None)
        ):
            return
        settings = state.settings
        conn = RealtimeConnection(ws, state.engine, settings.limits, telemetry, settings.slow_consumer_timeout)
        state.realtime_connections.add(conn)
        try:
            await conn.run(subprotocol)
        finally:
            state.realtime_connections.discard(conn)
            state.gate.leave()

    def require_key(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not policy.key_ok(bearer_token(request.headers)):
                telemetry.error(ErrorCode.UNAUTHORIZED.value)
                body = {
                    "error": {
                        "message": "a valid API key is required (Authorization: Bearer KEY)",
                        "type": "authentication_error",
                        "param": None,
                        "code": "unauthorized",
                    }
                }
                return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await endpoint(request)

        return guarded

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.engine.ready and not state.draining:
            return JSONResponse({"status": "ready", "model": state.engine.model_name})
        status = "draining" if state.draining else "failed" if state.load_error else "loading"
        body = {"status": status, "model": state.engine.model_name, "error": state.load_error}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def stats(request: Request) -> Response:
        """The tutorial's ConnectionManager.get_stats and StreamingMetrics.get_performance_report, and the engine."""
        es = state.engine.stats()
        sessions = telemetry.sessions
        return JSONResponse(
            {
                "model": state.engine.model_name,
                "ready": state.engine.ready,
                "engine": {
                    "running": es.running,
                    "waiting": es.waiting,
                    "paused": es.paused,
                    "max_batch_size": es.max_batch_size,
                    "kv_cache_tokens_used": es.kv_cache_tokens_used,
                    "kv_cache_tokens_capacity": es.kv_cache_tokens_capacity,
                    "steps": es.steps,
                    "backend": es.backend,
                },
                "active_connections": len(state.connections),
                "realtime_connections": len(state.realtime_connections),
                "resumable_generations": len(state.generations),
                "orphaned_generations": state.generations.orphaned,
                "connections": [
                    {
                        "connection": public_ref(c.session),
                        "connected_at": c.connected_at,
                        "messages_sent": c.messages_sent,
                        "tokens_generated": c.tokens_sent,
                        "generations_running": c.running_generations,
                    }
                    for c in list(state.connections)
                ],
                "performance": sessions.performance_report(),
                "active_sessions": [_public(s) for s in list(sessions.current.values())],
                "completed_sessions": [_public(s) for s in list(sessions.completed)[-50:]],
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(state.load())
        sweeper = asyncio.create_task(state.sweep_generations())
        watch = asyncio.create_task(FdWatch().run())
        try:
            yield
        finally:
            for task in (state.load_task, sweeper, watch, *state.abandon_generations()):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await state.engine.shutdown()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/tutorial", tutorial),
            Mount("/static", StaticFiles(directory=str(web)), name="static"),  # web/ is a real folder once installed
            WebSocketRoute("/", websocket),
            WebSocketRoute("/ws", websocket),
            WebSocketRoute("/v1/realtime", realtime),
            Route("/health", health),
            Route("/ready", ready),
            Route("/v1/stats", stats),
            Route("/v1/stats/timeline", timeline),
            Route("/metrics", metrics),
            Route("/dashboard", dashboard),
            Route("/v1/models", require_key(api.models)),
            Route("/v1/chat/completions", require_key(api.chat_completions), methods=["POST"]),
            Route("/v1/completions", require_key(api.completions), methods=["POST"]),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(ExposeTransport),
            Middleware(RequestCap, gate=state.gate),
            Middleware(
                RequestGuard,
                policy=policy,
                max_body_bytes=max_body_bytes or state.settings.limits.max_message_bytes,
                on_refused=telemetry.error,
            ),
        ],
        exception_handlers={Exception: internal_error},
    )
    app.state.tokenwire = state
    return app
