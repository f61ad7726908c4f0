"""The ASGI application: the route table, its middleware, and the server state they share.

Each door has its package: ws/ (tokenwire's own WebSocket protocol), openai/ (the OpenAI HTTP API), realtime/
(``WS /v1/realtime``), responses/ (the Responses API over SSE and WebSocket). The pieces they share sit beside them
(params.py, errors.py, streams.py, sse.py, resume/, auth, limits, telemetry). routes.py has the handlers for pages,
probes, stats, the WebSocket doors and broadcast; the life cycle (load, watch, drain, sweep) is lifecycle.py's.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from tokenwire.engine.interface import Engine
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.admission.capacity import RequestCap
from tokenwire.server.admission.http_guard import CorsGuard, RequestGuard
from tokenwire.server.openai.routes import OpenAIRoutes
from tokenwire.server.responses.routes import ResponsesRoutes
from tokenwire.server.responses.service import Responses
from tokenwire.server.responses.store import ResponseStore
from tokenwire.server.running.lifecycle import ServerState, lifespan
from tokenwire.server.running.routes import Routes
from tokenwire.server.settings import ServerSettings
from tokenwire.server.streaming.backlog import expose_transport
from tokenwire.server.telemetry import Telemetry

__all__ = ["ServerState", "create_app"]


class App(Starlette):
    """Starlette, but it first notes the server's transport in the scope (backlog.py: flow control reads it)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expose_transport(scope, send)
        await super().__call__(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """No such route (404) or method (405): under ``/v1/`` an OpenAI-shaped error naming the method and path, as
    OpenAI answers, so that API clients show it; elsewhere Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith("/v1/") or exc.status_code not in (404, 405):
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    what = "no such endpoint" if exc.status_code == 404 else "this endpoint does not take that method"
    error = {"message": f"{what}: {request.method} {request.url.path}", "type": "invalid_request_error"}
    body = {"error": {**error, "param": None, "code": "not_found" if exc.status_code == 404 else "method_not_allowed"}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug in a route: an OpenAI-shaped 500 (the exception is logged by the server), never a plain-text page."""
    error = {"message": "the server failed to handle this request", "type": "server_error", "param": None}
    return JSONResponse({"error": {**error, "code": "internal_error"}}, status_code=500)


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    on_fatal: Callable[[], None] | None = None,
    sse_keepalive_interval: float = 15.0,
    public_url: str | None = None,
    auth: AuthPolicy | None = None,
    max_body_bytes: int | None = None,
    admin_key: str | None = None,
    drain_timeout: float = 25.0,
    hosted: bool = False,
) -> Starlette:
    """The app. ``max_body_bytes`` caps HTTP request bodies (None: the WebSocket frame limit); ``admin_key`` enables
    ``POST /v1/admin/broadcast``; ``drain_timeout`` is how long running generations may take to finish on SIGTERM;
    ``hosted``: run by another framework's server (Ray Serve), see lifecycle.ServerState."""
    policy = auth or AuthPolicy()
    state = ServerState(engine, settings or ServerSettings(), on_fatal, public_url, drain_timeout, hosted)
    telemetry = Telemetry(
        engine.stats,
        lambda: len(state.connections) + len(state.realtime_connections),
        lambda: (state.generations.orphaned, state.generations.nbytes),
    )
    state.use(telemetry)
    api = OpenAIRoutes(
        engine, state.settings.limits, sse_keepalive_interval, telemetry, policy.enabled, state.key_limits
    )
    state.doors.append(api)
    settings = state.settings
    responses = Responses(
        engine, telemetry, ResponseStore(settings.responses_store, settings.responses_ttl), state.key_limits
    )
    state.doors.append(responses)
    state.responses = responses
    resp = ResponsesRoutes(responses, settings.limits, policy.enabled, sse_keepalive_interval)
    r = Routes(state, telemetry, policy, admin_key)
    app = App(
        routes=_routes(r, api, resp),
        lifespan=lambda app: lifespan(state),
        middleware=[
            Middleware(CorsGuard, policy=policy, on_refused=telemetry.error),
            Middleware(RequestCap, gate=state.gate, per_ip=state.per_ip),
            Middleware(
                RequestGuard,
                max_body_bytes=max_body_bytes or state.settings.limits.max_message_bytes,
                on_refused=telemetry.error,
            ),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    app.state.tokenwire = state
    return app


def _routes(r: Routes, api: OpenAIRoutes, resp: ResponsesRoutes) -> list[BaseRoute]:
    """The route table: the pages, the WebSocket doors, probes and figures, the OpenAI and Responses APIs (behind
    the key check) and the operator's broadcast."""
    return [
        Route("/", r.index),
        Route("/tutorial", r.tutorial),
        Route("/client.js", r.client_js),
        Mount("/static", StaticFiles(directory=r.web_dir), name="static"),
        WebSocketRoute("/", r.websocket),
        WebSocketRoute("/ws", r.websocket),
        WebSocketRoute("/v1/realtime", r.realtime),
        WebSocketRoute("/v1/responses", r.responses),
        Route("/health", r.health),
        Route("/ready", r.ready),
        Route("/v1/stats", r.stats),
        Route("/v1/stats/timeline", r.timeline),
        Route("/metrics", r.metrics),
        Route("/dashboard", r.dashboard),
        Route("/v1/models", r.require_key(api.models)),
        Route("/v1/models/{model_id:path}", r.require_key(api.model), methods=["GET"]),
        Route("/v1/chat/completions", r.require_key(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", r.require_key(api.completions), methods=["POST"]),
        Route("/v1/responses", r.require_key(resp.create), methods=["POST"]),
        Route("/v1/responses/{response_id}", r.require_key(resp.retrieve), methods=["GET"]),
        Route("/v1/responses/{response_id}", r.require_key(resp.delete), methods=["DELETE"]),
        Route("/v1/responses/{response_id}/cancel", r.require_key(resp.cancel), methods=["POST"]),
        Route("/v1/admin/broadcast", r.broadcast, methods=["POST"]),
    ]
