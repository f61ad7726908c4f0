"""How many bytes a WebSocket's reader has not taken yet: asyncio's write buffer plus the kernel's send queue.

A client that reads slowly is not seen by ``send`` until every buffer on the way is full: asyncio's (64 KiB) and
the kernel's, which on Linux grows to megabytes, thousands of token messages. Flow control needs to know sooner,
so the connection asks the socket itself: ``SIOCOUTQ`` counts the bytes the peer has not acknowledged, which on a
stalled reader is what its receive window refused. Where that cannot be read (not Linux, no transport), the
backlog is unknown and only a blocked ``send`` shows a slow reader.

The ASGI interface hides the transport, so :func:`expose_transport`, called first by the app (before any
middleware wraps ``send``), puts the server's transport into the scope on its way in.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import termios
import time
from typing import Any

from starlette.types import Scope, Send

SCOPE_KEY = "tokenwire.transport"


def expose_transport(scope: Scope, send: Send) -> None:
    """Put the server's transport (uvicorn's protocols have one, as ``send``'s owner) into ``scope``."""
    if scope["type"] in ("http", "websocket"):
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is not None:
            scope[SCOPE_KEY] = transport


class Backlog:
    """The unread bytes of one connection's socket (see the module docstring)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._fd: int | None = None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self._fd = sock.fileno()

    @classmethod
    def of(cls, scope: Scope) -> Backlog:
        return cls(scope.get(SCOPE_KEY))

    @property
    def known(self) -> bool:
        return self._transport is not None

    async def room(self, limit: int, stuck_after: float, poll: float = 0.02) -> bool:
        """Wait until fewer than ``limit`` bytes are unread (at once where the backlog is unknown, or ``limit`` is 0);
        False if the reader took nothing at all for ``stuck_after`` seconds meanwhile (one that reads, however
        slowly, is waited for)."""
        if limit <= 0 or not self.known:
            return True
        unread = self.unread_bytes()
        deadline = time.monotonic() + stuck_after
        while unread >= limit:
            await asyncio.sleep(poll)
            now_unread = self.unread_bytes()
            if now_unread < unread:  # it reads, if slowly
                deadline = time.monotonic() + stuck_after
            elif time.monotonic() >= deadline:
                return False
            unread = now_unread
        return True

    def unread_bytes(self) -> int:
        """Bytes written but not taken by the peer yet (0 when unknown)."""
        transport = self._transport
        if transport is None:
            return 0
        try:
            queued = int(transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return 0
        if self._fd is not None:
            buf = array.array("i", [0])
            try:
                fcntl.ioctl(self._fd, termios.TIOCOUTQ, buf)
                queued += buf[0]
            except OSError:
                self._fd = None  # closed, or not a TCP socket: asyncio's buffer is all we know
        return queued
