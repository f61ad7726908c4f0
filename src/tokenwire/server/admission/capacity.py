"""How many connections the process can hold: file descriptors, the connection cap, and saying so when full.

Every open socket costs a file descriptor. A process that runs out can accept nothing, not even a health check,
and nothing tells the operator why. So: the soft descriptor limit is raised to the hard one at start; WebSockets
and API requests are capped below it (:class:`ConnectionGate`, ``--max-connections``), keeping a reserve for
``/health``, ``/ready``, ``/metrics`` and the process's own files; and :class:`FdWatch` logs once per episode when
descriptors run short anyway (connections that never send a request count too), and once when they recover.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenwire.server.admission.http_guard import send_error
from tokenwire.server.requests.errors import ErrorCode, openai_type

_OVERLOADED_TYPE = openai_type(ErrorCode.OVERLOADED)

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/ready", "/metrics"})  # always answered: they are how operators see trouble


def fd_limit() -> int | None:
    """The soft limit on open file descriptors, or None where it cannot be read."""
    try:
        import resource
    except ImportError:  # not on a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_fd_limit() -> int | None:
    """Raise the soft descriptor limit to the hard limit (what the operator allowed); returns the new soft limit."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return fd_limit()


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc (not Linux)
        return None


def reserve_for(limit: int) -> int:
    """Descriptors kept back from connections: for probes, logs, model files, libraries."""
    return max(64, limit // 20)


def auto_max_connections() -> int:
    """The connection cap when ``--max-connections`` is 0: the descriptor limit less what is open less a reserve.
    0 (no cap) where the limit cannot be read."""
    limit = fd_limit()
    if limit is None:
        return 0
    return max(16, limit - (open_fds() or 0) - reserve_for(limit))


@dataclass(slots=True)
class ConnectionGate:
    """Counts WebSockets and API requests against ``limit`` (0: no cap); logs once when it fills, once when not."""

    limit: int = 0
    open: int = 0
    refused: int = 0
    _full: bool = False

    def enter(self) -> bool:
        """Take a place; False (and nothing taken) when every place is taken."""
        if self.limit and self.open >= self.limit:
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning(
                    "connection limit reached: %d open (--max-connections %d); refusing new WebSockets (1013) and "
                    "API requests (503) until some close; /health and /ready still answer",
                    self.open,
                    self.limit,
                )
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1
        if self._full and self.open < self.limit * 0.9:
            self._full = False
            log.warning("below the connection limit again: %d open, %d refused meanwhile", self.open, self.refused)
            self.refused = 0


@dataclass(slots=True)
class IpGate:
    """Counts WebSockets and API requests per client address against ``limit`` (0: no cap). Behind a proxy the
    address is the client's only when the proxy is trusted (``--trusted-proxies``: uvicorn then takes it from
    X-Forwarded-For); otherwise every client has the proxy's. Memory: one entry per address with connections."""

    limit: int = 0
    _open: dict[str, int] = field(default_factory=dict)

    def enter(self, ip: str) -> bool:
        if not self.limit:
            return True
        n = self._open.get(ip, 0)
        if n >= self.limit:
            return False
        self._open[ip] = n + 1
        return True

    def leave(self, ip: str) -> None:
        if not self.limit:
            return
        n = self._open.get(ip, 0) - 1
        if n > 0:
            self._open[ip] = n
        else:
            self._open.pop(ip, None)

    def open(self, ip: str) -> int:
        return self._open.get(ip, 0)


def client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


PER_IP_FULL = "this address already holds {} connections (--max-connections-per-ip); close one or try again later"


class RequestCap:
    """ASGI middleware: API requests past the gate's limit, or past the per-address limit, get 503 ``overloaded``
    at once; probes always pass. (WebSockets are gated by their routes, which answer in their own protocol.)"""

    def __init__(self, app: ASGIApp, gate: ConnectionGate, per_ip: IpGate | None = None) -> None:
        self.app = app
        self.gate = gate
        self.per_ip = per_ip or IpGate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _relative_path(scope) in PROBES or not (self.gate.limit or self.per_ip.limit):
            await self.app(scope, receive, send)
            return
        ip = client_ip(scope)
        if not self.per_ip.enter(ip):
            message = PER_IP_FULL.format(self.per_ip.limit)
            await send_error(
                send, 503, "overloaded", message, openai_type(ErrorCode.OVERLOADED), [(b"retry-after", b"1")]
            )
            return
        if not self.gate.enter():
            self.per_ip.leave(ip)
            message = "the server holds as many connections as it may; try again later"
            await send_error(
                send, 503, "overloaded", message, openai_type(ErrorCode.OVERLOADED), [(b"retry-after", b"1")]
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.leave()
            self.per_ip.leave(ip)


def _relative_path(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


class FdWatch:
    """Logs once when open descriptors pass ``high`` of the limit, and once when they are back under ``low``."""

    def __init__(self, interval: float = 1.0, high: float = 0.95, low: float = 0.85) -> None:
        self.interval = interval
        self.high = high
        self.low = low
        self.short_since: float | None = None

    def check(self, used: int, limit: int) -> None:
        if self.short_since is None and used >= limit * self.high:
            self.short_since = time.monotonic()
            log.error(
                "running out of file descriptors: %d of %d open; new connections will fail until some close "
                "(raise ulimit -n, or lower --max-connections; docs/deployment.md)",
                used,
                limit,
            )
        elif self.short_since is not None and used < limit * self.low:
            log.warning(
                "file descriptors recovered: %d of %d open, after %.0f s short",
                used,
                limit,
                time.monotonic() - self.short_since,
            )
            self.short_since = None

    async def run(self) -> None:
        limit = fd_limit()
        if limit is None or open_fds() is None:
            return
        while True:
            await asyncio.sleep(self.interval)
            used = open_fds()
            if used is not None:
                self.check(used, limit)
