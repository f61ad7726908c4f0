"""API keys and WebSocket origin checks. Pure functions over headers and query strings; no I/O.

With keys configured, HTTP requests need ``Authorization: Bearer KEY``; a WebSocket may send that header, or
the subprotocol ``bearer.KEY``, or ``?api_key=KEY`` (browsers cannot set headers on a WebSocket). Keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

SUBPROTOCOL_PREFIX = "bearer."
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


@dataclass(slots=True, frozen=True)
class AuthPolicy:
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # besides the server's own origin and local pages; "*" allows any

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)

    def key_ok(self, key: str | None) -> bool:
        if not self.api_keys:
            return True
        if not key:
            return False
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)


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


def origin_allowed(origin: str | None, host: str | None, policy: AuthPolicy) -> bool:
    """Allowed: no Origin (not a browser), the server's own origin, pages on this machine (localhost, file://,
    which browsers send as "null"), and the configured list ("*" for any)."""
    if origin is None or "*" in policy.allowed_origins or origin in policy.allowed_origins:
        return True
    if origin == "null":
        return True
    parts = urlsplit(origin)
    if host is not None and parts.netloc == host:
        return True
    return (parts.hostname or "") in LOCAL_HOSTS or f"[{parts.hostname}]" in LOCAL_HOSTS
