"""Run the app under uvicorn with the WebSocket limits from the settings."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from tokenwire import __version__
from tokenwire.config import Settings
from tokenwire.engine.factory import build_engine
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.admission.capacity import auto_max_connections, raise_fd_limit
from tokenwire.server.requests.params import Limits
from tokenwire.server.running.app import ServerState, create_app
from tokenwire.server.settings import ServerSettings
from tokenwire.server.streaming.flow import FlowPolicy

log = logging.getLogger(__name__)


def auth_policy(settings: Settings) -> AuthPolicy:
    keys = tuple(k.strip() for k in (settings.api_key or "").split(",") if k.strip())
    origins = tuple(o.strip() for o in settings.allowed_origins.split(",") if o.strip())
    if settings.null_origin not in ("allow", "refuse"):
        raise ValueError(f"--null-origin must be allow or refuse, not {settings.null_origin!r}")
    return AuthPolicy(api_keys=keys, allowed_origins=origins, null_origin=settings.null_origin == "allow")


def server_settings(settings: Settings) -> ServerSettings:
    if settings.journal != "memory" and settings.resume_window <= 0:
        raise ValueError("a shared --journal keeps generations for resume: it needs --resume-window above 0")
    return ServerSettings(
        limits=Limits(
            max_message_bytes=settings.max_message_bytes,
            max_tokens=settings.max_tokens_limit,
            default_max_tokens=min(settings.default_max_tokens, settings.max_tokens_limit),
            max_generations_per_connection=settings.max_generations_per_connection,
        ),
        heartbeat_interval=settings.heartbeat_interval,
        slow_consumer_timeout=settings.slow_consumer_timeout,
        resume_window=max(0.0, settings.resume_window),
        resume_buffer_bytes=int(max(0.0, settings.resume_buffer_mb) * (1 << 20)),
        max_connections=settings.max_connections if settings.max_connections > 0 else auto_max_connections(),
        flow=FlowPolicy(max_unsent_tokens=max(0, settings.max_unsent_tokens)),
        max_connections_per_ip=max(0, settings.max_connections_per_ip),
        max_generations_per_key=max(0, settings.max_generations_per_key),
        rate_limit_tokens_per_minute=max(0, settings.rate_limit),
        journal_url=journal_url(settings.journal),
        journal_lease=max(0.3, settings.journal_lease),
        responses_store=max(0, settings.responses_store),
        responses_ttl=max(0.0, settings.responses_ttl),
    )


def journal_url(journal: str) -> str | None:
    """``--journal``: memory (this process), or redis://HOST:PORT/DB (shared by replicas)."""
    if journal == "memory":
        return None
    if journal.startswith(("redis://", "rediss://", "unix://")):
        return journal
    raise ValueError(f"--journal must be memory or a redis:// URL (redis://HOST:PORT/DB), not {journal!r}")


class _Server(uvicorn.Server):
    """uvicorn, but it drains first (lifecycle.py): running generations may finish within --drain-timeout while the
    port still answers (refusing new work), then open WebSockets hear ``shutting_down`` and close with 1001. A
    second signal (uvicorn sets ``force_exit``) cuts the wait short."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first SIGTERM or SIGINT drains; a second of either stops at once (uvicorn's own: only SIGINT)."""
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._state.drain(lambda: self.force_exit)
        await super().shutdown(sockets)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """uvicorn's settings for the app: the WebSocket implementation, frame limit, compression and pings."""
    if settings.ws_compression not in ("deflate", "none"):
        raise ValueError(f"--ws-compression must be deflate or none, not {settings.ws_compression!r}")
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=settings.ws_compression == "deflate",
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level=settings.log_level,
        log_config=None,  # keep tokenwire's handlers (text or JSON) for uvicorn's loggers too
        proxy_headers=True,  # the client's address from X-Forwarded-For, only from --trusted-proxies
        forwarded_allow_ips=settings.trusted_proxies,
        timeout_graceful_shutdown=5,
    )


def build_app(settings: Settings, on_fatal: Callable[[], None] | None, hosted: bool = False) -> Starlette:
    """The app for ``settings``, with its own engine (not loaded yet: the app's lifespan loads it)."""
    return create_app(
        build_engine(settings),
        server_settings(settings),
        on_fatal=on_fatal,
        sse_keepalive_interval=settings.sse_keepalive_interval,
        public_url=f"http://{settings.host}:{settings.port}",
        auth=auth_policy(settings),
        max_body_bytes=settings.max_body_bytes,
        admin_key=settings.admin_key,
        drain_timeout=max(0.0, settings.drain_timeout),
        hosted=hosted,
    )


def run(settings: Settings) -> int:
    """Serve until stopped; returns the process exit code (1 when the model could not be loaded)."""
    uvicorn_config(settings, None)  # bad settings fail before the model loads
    if settings.replicas > 0:  # Ray Serve runs the replicas and the HTTP proxy
        from tokenwire.server.running.ray_app import run_ray

        return run_ray(settings)
    fds = raise_fd_limit()
    server: _Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, stop)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", settings.host)
    config = uvicorn_config(settings, app)
    server = _Server(config, app.state.tokenwire)
    log.info(
        "tokenwire %s: listening on http://%s:%d, loading the model; up to %s connections (open-file limit %s)",
        __version__,
        settings.host,
        settings.port,
        app.state.tokenwire.gate.limit or "any number of",
        fds if fds is not None else "unknown",
    )
    server.run()
    state = app.state.tokenwire
    return 1 if state.load_error or state.engine_error else 0
