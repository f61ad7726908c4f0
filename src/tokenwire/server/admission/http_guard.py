"""What every HTTP request with a body passes before a route sees it: the origin rule and the body limit.

- A browser sends a cross-site ``text/plain`` or form-encoded POST without asking first (no CORS preflight), so
  any page a user visits could drive a local tokenwire. A request whose ``Origin`` is not allowed (auth.py) and
  whose body is not JSON is refused with 403. ``curl -d`` sends a form-encoded body but no ``Origin``: it works.
- A body larger than ``max_body_bytes`` is refused with 413: when ``Content-Length`` says so, else as soon as the
  bytes read pass the limit; it is never held. The 413's headers go out at once, then the rest of the body is read
  and thrown away (up to ``DISCARD_BYTES`` or ``DISCARD_SECONDS``, whichever comes first) before the answer ends
  and the connection closes: a client that writes its whole body before it reads (httpx's ``AsyncClient``, so the
  ``openai`` package) would otherwise hit a reset connection instead of the 413 (nginx's lingering close). A
  client that sent ``Expect: 100-continue`` (curl) and has not been asked for its body gets the 413 at once. A body
  within the limit is read here and handed on unchanged.

- CORS: a page whose origin is allowed (the same rule as for WebSocket upgrades, auth.py: this machine's pages,
  the server's own, ``--allowed-origins``) may call the HTTP API from its scripts. Its preflight (``OPTIONS``
  with ``Access-Control-Request-Method``) is answered here, before any route or key check, and every answer to
  such a page carries ``Access-Control-Allow-Origin``; another origin's preflight gets 403 and no CORS header,
  so its browser never sends the request.

Two middlewares: ``CorsGuard`` (the origin rule, preflights, CORS headers) outside the request cap
(capacity.py), so that its 503 is readable by an allowed page too, and ``RequestGuard`` (the body checks) inside
it, so that nothing is read from a request the cap refuses. Refusals are OpenAI-shaped JSON errors. Pure ASGI, so
that nothing is buffered before these checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.server.admission.auth import AuthPolicy, origin_allowed

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
DISCARD_BYTES = 64 << 20  # the most of an over-limit body read and thrown away so that its sender sees the 413
DISCARD_SECONDS = 5.0  # and the longest that may take


def is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


ORIGIN_ALLOWED = "tokenwire.origin_allowed"  # the scope key where CorsGuard leaves its verdict for RequestGuard


class CorsGuard:
    """The outermost middleware: works out the origin rule once per request, answers preflights, and makes every
    answer to an allowed page readable by it (the request cap's 503 included, which comes before RequestGuard)."""

    def __init__(self, app: ASGIApp, policy: AuthPolicy, on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.policy = policy
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allowed = origin_allowed(origin, headers.get("host"), self.policy, http=True)  # no Origin: not a browser
        scope[ORIGIN_ALLOWED] = allowed
        if origin is not None:
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(send, origin, headers, allowed)
                return
            if allowed:
                send = _with_cors(send, origin)
        await self.app(scope, receive, send)

    async def _preflight(self, send: Send, origin: str, headers: Headers, allowed: bool) -> None:
        """A browser asks whether a page at ``origin`` may send a request with a JSON body or an API key."""
        if not allowed:
            await _refuse(
                send,
                self.on_refused,
                403,
                "forbidden_origin",
                f"pages at {origin!r} may not call this server; add the origin to --allowed-origins",
            )
            return
        out = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin, Access-Control-Request-Headers"),
            (b"content-length", b"0"),
        ]
        asked = headers.get("access-control-request-headers")
        if asked:
            out.append((b"access-control-allow-headers", asked[:1024].encode("latin-1")))
        if headers.get("access-control-request-private-network") == "true":  # a public page asks for a local server
            out.append((b"access-control-allow-private-network", b"true"))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class RequestGuard:
    """The body checks, inside the request cap and behind CorsGuard (whose verdict on the origin it reads): a
    non-JSON body from a page not allowed, and the size limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not is_json_type(headers.get("content-type")) and not scope[ORIGIN_ALLOWED]:
            await _refuse(
                send,
                self.on_refused,
                403,
                "forbidden_origin",
                f"a request from the page at {headers.get('origin')!r} with a body that is not JSON is refused (a "
                "browser sends those cross-site without asking); add the origin to --allowed-origins, or send "
                "Content-Type: application/json",
            )
            return
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            # Not a byte read yet: a client waiting for "100 Continue" never sends the body, and is not asked to.
            waits = "100-continue" in headers.get("expect", "").lower()
            rest = 0 if waits or int(length) > DISCARD_BYTES else int(length)
            await self._too_large(send, receive, int(length), rest)
            return
        declared = int(length) if length is not None and length.strip().isdigit() else None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                more = message.get("more_body", False)
                rest = DISCARD_BYTES if declared is None else max(0, declared - size)
                await self._too_large(send, receive, None, rest if more and rest <= DISCARD_BYTES else 0)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, which streaming routes watch for

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, receive: Receive, length: int | None, rest: int) -> None:
        """The 413; ``rest``: how much of the body to read and throw away between its headers and its end."""
        size = f" ({length} bytes)" if length is not None else ""
        message = f"the request body{size} is larger than the limit of {self.max_body_bytes} bytes (--max-body-bytes)"
        if self.on_refused is not None:
            self.on_refused("request_too_large")
        start, body = error_messages(413, "request_too_large", message, extra_headers=[(b"connection", b"close")])
        await send(start)
        if rest > 0:
            # uvicorn's receive() says "disconnect" once the answer is complete: the rest is read before its end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCARD_SECONDS):
                    await discard(receive, rest)
        await send(body)


async def discard(receive: Receive, limit: int) -> None:
    """Read the rest of a request body, keeping none of it, until it ends, the client leaves or ``limit`` bytes."""
    read = 0
    while read < limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _refuse(send: Send, on_refused: Callable[[str], None] | None, status: int, code: str, message: str) -> None:
    if on_refused is not None:
        on_refused(code)
    await send_error(send, status, code, message, extra_headers=[(b"connection", b"close")])


def _with_cors(send: Send, origin: str) -> Send:
    """``send``, with the headers that let the page at ``origin`` read the answer (unless the route set its own)."""

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent = list(message.get("headers", []))
            if not any(name.lower() == b"access-control-allow-origin" for name, _ in sent):
                sent += [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", b"Retry-After"),
                    (b"vary", b"Origin"),
                ]
                message = {**message, "headers": sent}
        await send(message)

    return cors_send


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    kind: str = "invalid_request_error",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with an OpenAI-shaped JSON error, from ASGI middleware (before any route runs)."""
    start, body = error_messages(status, code, message, kind, extra_headers)
    await send(start)
    await send(body)


def error_messages(
    status: int,
    code: str,
    message: str,
    kind: str = "invalid_request_error",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[Message, Message]:
    """The ASGI messages of an OpenAI-shaped JSON error: the response's start and its whole body."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])}
    return start, {"type": "http.response.body", "body": body, "more_body": False}
