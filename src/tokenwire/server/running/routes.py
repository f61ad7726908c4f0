"""The handlers of the server's own routes: pages, probes, stats, the WebSocket doors, and the operator's broadcast.

The OpenAI HTTP routes are openai/routes.py's; app.py puts them all in one table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocket

from tokenwire.metrics import Session
from tokenwire.server.admission.auth import (
    AuthPolicy,
    bearer_token,
    key_matches,
    origin_allowed,
    owner_of,
    websocket_key,
)
from tokenwire.server.admission.capacity import PER_IP_FULL, client_ip, open_fds
from tokenwire.server.realtime import protocol as rt
from tokenwire.server.realtime.connection import RealtimeConnection
from tokenwire.server.requests import errors
from tokenwire.server.requests.errors import GOING_AWAY, POLICY_VIOLATION, TRY_AGAIN_LATER, ErrorCode
from tokenwire.server.responses.websocket import ResponsesConnection, responses_error
from tokenwire.server.running.lifecycle import ServerState
from tokenwire.server.telemetry import Telemetry, public_ref
from tokenwire.server.ws import messages
from tokenwire.server.ws.connection import Connection

log = logging.getLogger(__name__)

FULL = "the server holds as many connections as it may (--max-connections); try again later"
DRAINING = "the server is shutting down; reconnect and try again shortly"
MAX_NOTICE_CHARS = 4096

Endpoint = Callable[[Request], Awaitable[Response]]


def _public(session: Session) -> dict[str, object]:
    """A session of the report, its ids replaced by digests (public_ref)."""
    return {
        **session.as_dict(),
        "session_id": public_ref(session.session_id),
        "connection": public_ref(session.connection),
    }


def process_report() -> dict[str, object]:
    """The server process's footprint: resident memory, open descriptors, asyncio tasks (what a soak watches)."""
    rss_mb = None
    try:
        with open("/proc/self/statm") as f:
            rss_mb = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"pid": os.getpid(), "rss_mb": rss_mb, "open_fds": open_fds(), "tasks": len(asyncio.all_tasks())}


def api_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": errors.openai_type(code, status), "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Routes:
    def __init__(self, state: ServerState, telemetry: Telemetry, policy: AuthPolicy, admin_key: str | None) -> None:
        self.state = state
        self.telemetry = telemetry
        self.policy = policy
        self.admin_key = admin_key
        web = resources.files("tokenwire.web")
        self.web_dir = str(web)  # a real folder once installed
        self._pages = {
            name: web.joinpath(f"{name}.html").read_text(encoding="utf-8")
            for name in ("index", "tutorial", "dashboard")
        }
        self._client_js = web.joinpath("client.js").read_text(encoding="utf-8")

    # -- pages and probes
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self._pages["index"])

    async def tutorial(self, request: Request) -> Response:
        return HTMLResponse(self._pages["tutorial"])

    async def client_js(self, request: Request) -> Response:
        """``GET /client.js``: the browser client, an ES module (web/client.js) that the chat page imports too. Any
        page may import it (public code, no credentials): the WebSocket it opens is what --allowed-origins checks."""
        return Response(self._client_js, media_type="text/javascript", headers={"Access-Control-Allow-Origin": "*"})

    async def dashboard(self, request: Request) -> Response:
        return HTMLResponse(self._pages["dashboard"])

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        state = self.state
        if state.accepting:
            return JSONResponse({"status": "ready", "model": state.engine.model_name})
        if state.draining:
            status = "draining"
        elif state.load_error or state.engine_error:
            status = "failed"
        else:
            status = "loading"
        error = state.load_error or state.engine_error
        body = {"status": status, "model": state.engine.model_name, "error": error}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def metrics(self, request: Request) -> Response:
        return Response(self.telemetry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def timeline(self, request: Request) -> Response:
        try:
            window = min(3600, max(10, int(request.query_params.get("window", "300"))))
        except ValueError:
            window = 300
        es = self.state.engine.stats()
        return JSONResponse(
            {
                "series": self.telemetry.timeline.series(window=window),
                "now": {"running": es.running, "waiting": es.waiting, "connections": len(self.state.connections)},
            }
        )

    async def stats(self, request: Request) -> Response:
        """The tutorial's ConnectionManager.get_stats and StreamingMetrics.get_performance_report, and the engine."""
        state = self.state
        es = state.engine.stats()
        sessions = self.telemetry.sessions
        return JSONResponse(
            {
                "model": state.engine.model_name,
                "ready": state.engine.ready,
                "draining": state.draining,
                "engine": {
                    "running": es.running,
                    "waiting": es.waiting,
                    "paused": es.paused,
                    "max_batch_size": es.max_batch_size,
                    "kv_cache_tokens_used": es.kv_cache_tokens_used,
                    "kv_cache_tokens_capacity": es.kv_cache_tokens_capacity,
                    "kv_cache_tokens_budget": es.kv_cache_tokens_budget,
                    "kv_cache_tokens_paused": es.kv_cache_tokens_paused,
                    "steps": es.steps,
                    "backend": es.backend,
                },
                "process": process_report(),
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

    # -- keys
    def require_key(self, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            if not self.policy.key_ok(bearer_token(request.headers)):
                self.telemetry.error(ErrorCode.UNAUTHORIZED.value)
                message = "a valid API key is required (Authorization: Bearer KEY)"
                return api_error(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
            return await endpoint(request)

        return guarded

    async def broadcast(self, request: Request) -> Response:
        """``POST /v1/admin/broadcast`` with the admin key: ``{"message": "...", "level": "info"}`` goes to every
        open WebSocket as a ``notice``; answers how many got it."""
        if not self.admin_key:
            return api_error(404, "not_found", "broadcast is off: start the server with --admin-key")
        if not key_matches(bearer_token(request.headers), self.admin_key):
            self.telemetry.error(ErrorCode.UNAUTHORIZED.value)
            message = "the admin key is required (Authorization: Bearer ADMIN_KEY; API keys do not work here)"
            return api_error(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return api_error(400, "invalid_json", "the body must be a JSON object")
        if not isinstance(body, dict):
            return api_error(400, "invalid_request", "the body must be a JSON object")
        text = body.get("message")
        level = body.get("level", "info")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_NOTICE_CHARS:
            return api_error(400, "invalid_request", f'"message" must be a text of 1 to {MAX_NOTICE_CHARS} characters')
        if level not in ("info", "warning"):
            return api_error(400, "invalid_request", '"level" must be "info" or "warning"')
        delivered = await self.state.broadcast(messages.notice(text, level=level, code="broadcast"))
        log.info("broadcast to %d connection(s): %s", delivered, text[:200])
        return JSONResponse({"delivered": delivered})

    # -- the WebSocket doors
    def _refusal(self, ws: WebSocket) -> tuple[str | None, str | None, str | None]:
        """(API key, subprotocol to accept, why the upgrade is refused or None) for a WebSocket request."""
        subprotocols = ws.scope.get("subprotocols") or []
        key, subprotocol = websocket_key(ws.headers, ws.query_params, subprotocols)
        problem = None
        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), self.policy):
            problem = "this page's origin may not open a WebSocket here (see --allowed-origins)"
        elif not self.policy.key_ok(key):
            problem = "an API key is required: send it as the subprotocol bearer.KEY, ?api_key=KEY or a Bearer header"
        return key, subprotocol, problem

    @staticmethod
    async def _refuse(
        ws: WebSocket, subprotocol: str | None, message: dict[str, object], code: int = POLICY_VIOLATION
    ) -> None:
        """Accept, so that the client can read why, then close with ``code`` (1008 policy, 1013 try again later,
        1001 going away)."""
        await ws.accept(subprotocol=subprotocol)
        await ws.send_text(messages.encode(message))
        await ws.close(code)

    async def _take_place(
        self, ws: WebSocket, subprotocol: str | None, full: Callable[[str], dict[str, object]]
    ) -> bool:
        """A place under --max-connections and --max-connections-per-ip (the caller leaves both when done, with
        :meth:`_leave`), or ``full(why)`` sent and close 1013."""
        ip = client_ip(ws.scope)
        if not self.state.per_ip.enter(ip):
            why = PER_IP_FULL.format(self.state.per_ip.limit)
        elif not self.state.gate.enter():
            self.state.per_ip.leave(ip)
            why = FULL
        else:
            return True
        self.telemetry.error(ErrorCode.OVERLOADED.value)
        await self._refuse(ws, subprotocol, full(why), TRY_AGAIN_LATER)
        return False

    def _leave(self, ws: WebSocket) -> None:
        self.state.gate.leave()
        self.state.per_ip.leave(client_ip(ws.scope))

    async def websocket(self, ws: WebSocket) -> None:
        state = self.state
        key, subprotocol, problem = self._refusal(ws)
        if problem is not None:
            self.telemetry.error(ErrorCode.UNAUTHORIZED.value)
            await self._refuse(ws, subprotocol, messages.error(ErrorCode.UNAUTHORIZED, problem))
            return
        if state.draining:
            self.telemetry.error(ErrorCode.SHUTTING_DOWN.value)
            await self._refuse(ws, subprotocol, messages.error(ErrorCode.SHUTTING_DOWN, DRAINING), GOING_AWAY)
            return
        if not await self._take_place(ws, subprotocol, lambda why: messages.error(ErrorCode.OVERLOADED, why)):
            return
        owner = owner_of(key if self.policy.enabled else None)
        conn = Connection(
            ws,
            state.engine,
            state.settings,
            self.telemetry,
            state.resumes,
            owner,
            lambda: not state.draining,
            state.key_limits,
        )
        await self._serve(ws, conn, state.connections, subprotocol)

    async def _serve(self, ws: WebSocket, conn: Any, open_now: set[Any], subprotocol: str | None) -> None:
        """Run an admitted WebSocket's connection, counted among those ``open_now`` (the drain reaches them there),
        and give its place back when it ends."""
        open_now.add(conn)
        try:
            await conn.run(subprotocol)
        finally:
            open_now.discard(conn)
            self._leave(ws)

    async def _admit(
        self, ws: WebSocket, error: Callable[[str, str], dict[str, object]], problem: tuple[str, str] | None = None
    ) -> tuple[str | None, str | None] | None:
        """The checks an OpenAI-style WebSocket door (Realtime, Responses) makes before it serves: key and origin,
        then the door's own ``problem`` (message, code), the drain (1001) and a loading model, then a place under
        the connection limits (1013). Returns (API key, subprotocol), or None once ``error(code, message)`` was
        sent and the socket closed."""
        state = self.state
        key, subprotocol, refused = self._refusal(ws)
        code, close = ErrorCode.UNAUTHORIZED.value, POLICY_VIOLATION
        if refused is None and problem is not None:
            refused, code = problem
        if refused is None and state.draining:
            refused, code, close = DRAINING, ErrorCode.SHUTTING_DOWN.value, GOING_AWAY
        elif refused is None and not state.engine.ready:
            refused, code = "the model is still loading; try again shortly", ErrorCode.OVERLOADED.value
        if refused is not None:
            self.telemetry.error(code)
            await self._refuse(ws, subprotocol, error(code, refused), close)
            return None
        if not await self._take_place(ws, subprotocol, lambda why: error(ErrorCode.OVERLOADED.value, why)):
            return None
        return key, subprotocol

    async def realtime(self, ws: WebSocket) -> None:
        state = self.state
        model = ws.query_params.get("model")
        problem = None
        if model is not None and model not in (state.engine.model_name, *state.engine.model_aliases):
            message = f"the model {model!r} does not exist; this server serves {state.engine.model_name!r}"
            problem = (message, "model_not_found")
        admitted = await self._admit(
            ws, lambda code, message: rt.error_event(rt.realtime_error(message, code), None), problem
        )
        if admitted is None:
            return
        key, subprotocol = admitted
        settings = state.settings
        tenant = owner_of(key if self.policy.enabled else None) or ""
        conn = RealtimeConnection(
            ws,
            state.engine,
            settings.limits,
            self.telemetry,
            settings.slow_consumer_timeout,
            tenant,
            state.key_limits,
        )
        await self._serve(ws, conn, state.realtime_connections, subprotocol)

    async def responses(self, ws: WebSocket) -> None:
        """``WS /v1/responses``: the Responses API's WebSocket mode (responses/websocket.py)."""
        state = self.state
        service = state.responses
        assert service is not None
        admitted = await self._admit(ws, lambda code, message: responses_error(errors.http_status(code), code, message))
        if admitted is None:
            return
        key, subprotocol = admitted
        tenant = owner_of(key if self.policy.enabled else None) or ""
        settings = state.settings
        conn = ResponsesConnection(ws, service, settings.limits, self.telemetry, settings.slow_consumer_timeout, tenant)
        await self._serve(ws, conn, state.responses_connections, subprotocol)
