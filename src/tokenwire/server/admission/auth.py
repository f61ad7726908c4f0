"""API keys and WebSocket origin checks. Pure functions over headers and query strings; no I/O.

With keys configured, HTTP requests need ``Authorization: Bearer KEY``; a WebSocket may send that header, or
the subprotocol ``bearer.KEY``, or ``?api_key=KEY`` (browsers cannot set headers on a WebSocket). Keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

SUBPROTOCOL_PREFIX = "bearer."
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def owner_of(api_key: str | None) -> str | None:
    """A tenant's identity: a digest of its API key, never the key (what a journal remembers of the key that
    started it, what per-key limits and fairness are kept by)."""
    return None if api_key is None else hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


@dataclass(slots=True, frozen=True)
class AuthPolicy:
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # besides the server's own origin and local pages; "*" allows any
    null_origin: bool = True  # WebSocket upgrades from Origin "null" (file:// pages, like the tutorial's)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)

    def key_ok(self, key: str | None) -> bool:
        if not self.api_keys:
            return True
        if not key:
            return False
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)


def key_matches(given: str | None, expected: str) -> bool:
    """``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def websocket_key(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Sequence[str]
) -> tuple[str | None, str | None]:
    """The key a WebSocket client sent, and the subprotocol to echo when it came that way."""
    token = bearer_token(headers)
    if token:
        return token, None
    for proto in subprotocols:
        if proto.startswith(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX) :], proto
    key = query.get("api_key")
    return (key or None), None


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_LOOPBACK = "loopback"  # what localhost, 127.0.0.1 and ::1 compare as


@dataclass(slots=True, frozen=True)
class Origin:
    """A browser origin, parsed: scheme, host (lower case; loopback names folded into one) and port."""

    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> Origin | None:
        """``scheme://host[:port]`` as browsers send it, or None for anything else (user info, a path, a query,
        a bad port: ``http://evil.example@localhost`` is not an origin of localhost, it is no origin at all)."""
        try:
            parts = urlsplit(text.strip().rstrip("/"))
            port = parts.port
        except ValueError:
            return None
        if not parts.scheme or not parts.hostname or "@" in parts.netloc or parts.path or parts.query:
            return None
        if parts.fragment:
            return None
        scheme = parts.scheme.lower()
        return cls(scheme, _fold(parts.hostname), port if port is not None else _DEFAULT_PORTS.get(scheme))

    @property
    def is_local(self) -> bool:
        return self.host == _LOOPBACK


def _fold(host: str) -> str:
    host = host.lower().strip("[]")
    return _LOOPBACK if host in LOCAL_HOSTS or host.startswith("127.") else host


def _same_server(origin: Origin, host_header: str | None) -> bool:
    """Whether ``origin`` names the host and port this request was sent to (its ``Host`` header)."""
    if not host_header:
        return False
    served = Origin.parse(f"{origin.scheme}://{host_header}")
    return served is not None and (served.host, served.port) == (origin.host, origin.port)


def origin_allowed(origin: str | None, host: str | None, policy: AuthPolicy, *, http: bool = False) -> bool:
    """Allowed: no Origin (not a browser), the server's own origin, pages on this machine (localhost, 127.0.0.1,
    ::1, any port), and the configured list ("*" for any). ``null`` (a page opened from a file, as the tutorial's
    page is) is allowed for WebSocket upgrades unless ``policy.null_origin`` is False, and is foreign for HTTP
    requests (``http``): nothing legitimate posts to the API from a file page, and sandboxed frames send it too."""
    if origin is None or "*" in policy.allowed_origins:
        return True
    if origin.strip() == "null":
        return policy.null_origin and not http
    parsed = Origin.parse(origin)
    if parsed is None:
        return False
    if parsed.is_local or _same_server(parsed, host):
        return True
    return any(Origin.parse(allowed) == parsed for allowed in policy.allowed_origins)
