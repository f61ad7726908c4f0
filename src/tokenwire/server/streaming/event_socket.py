"""What every WebSocket door (tokenwire's protocol, Realtime, the Responses WebSocket mode) shares: reading frames
until the client goes, and one writer at a time with a slow-consumer timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenwire.server.requests.errors import POLICY_VIOLATION
from tokenwire.server.telemetry import Telemetry

log = logging.getLogger(__name__)

ABNORMAL_CLOSURE = 1006


class SlowConsumer(WebSocketDisconnect):
    """A send that stayed blocked past the timeout: the client reads nothing."""

    def __init__(self) -> None:
        super().__init__(POLICY_VIOLATION)


async def read_frames(ws: WebSocket, handle: Callable[[str | bytes], Awaitable[None]]) -> int:
    """Pass every frame to ``handle`` until the client disconnects; returns its close code (1005 when it gave none;
    a disconnect raised meanwhile, a slow consumer's included, returns its code too)."""
    try:
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                return int(frame.get("code") or 1005)
            data = frame.get("text")
            if data is None:
                data = frame.get("bytes") or b""
            await handle(data)
    except WebSocketDisconnect as exc:
        return int(exc.code)


class Sender:
    """Writes text frames one at a time. A send still blocked after ``timeout`` seconds (the client reads nothing)
    raises :class:`SlowConsumer` and (``close_when_stuck``) closes the socket with 1008 without waiting for its
    close handshake; a door that must first let its generations go (tokenwire's protocol) closes it itself."""

    def __init__(
        self, ws: WebSocket, telemetry: Telemetry, timeout: float, what: str, close_when_stuck: bool = True
    ) -> None:
        self.ws = ws
        self.telemetry = telemetry
        self.timeout = timeout if timeout > 0 else None
        self.what = what  # for the log: which kind of socket
        self.close_when_stuck = close_when_stuck
        self.sent = 0  # frames written
        self._lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None

    async def send(self, data: str) -> None:
        async with self._lock:
            try:
                await asyncio.wait_for(self.ws.send_text(data), self.timeout)
            except TimeoutError:
                log.warning("closing a %s WebSocket: the client does not read", self.what)
                if self.close_when_stuck and self._closer is None:
                    self._closer = asyncio.create_task(self.ws.close(POLICY_VIOLATION))
                raise SlowConsumer() from None
            except RuntimeError as exc:  # sending after close
                raise WebSocketDisconnect(ABNORMAL_CLOSURE) from exc
        self.sent += 1
        self.telemetry.websocket_sent(data)
