"""What the OpenAI-style WebSockets (Realtime, the Responses WebSocket mode) share: reading frames until the
client goes, and one writer at a time with a slow-consumer timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenwire.server.requests.errors import POLICY_VIOLATION
from tokenwire.server.telemetry import Telemetry

log = logging.getLogger(__name__)

ABNORMAL_CLOSURE = 1006


async def read_frames(ws: WebSocket, handle: Callable[[str | bytes], Awaitable[None]]) -> None:
    """Pass every frame to ``handle`` until the client disconnects (returns then, also on WebSocketDisconnect)."""
    try:
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            data = frame.get("text")
            if data is None:
                data = frame.get("bytes") or b""
            await handle(data)
    except WebSocketDisconnect:
        return


class Sender:
    """Writes text frames one at a time. A send still blocked after ``timeout`` seconds (the client reads nothing)
    closes the socket with 1008 without waiting for its close handshake, and raises WebSocketDisconnect."""

    def __init__(self, ws: WebSocket, telemetry: Telemetry, timeout: float, what: str) -> None:
        self.ws = ws
        self.telemetry = telemetry
        self.timeout = timeout if timeout > 0 else None
        self.what = what  # for the log: which kind of socket
        self._lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None

    async def send(self, data: str) -> None:
        async with self._lock:
            try:
                await asyncio.wait_for(self.ws.send_text(data), self.timeout)
            except TimeoutError:
                log.warning("closing a %s WebSocket: the client does not read", self.what)
                if self._closer is None:
                    self._closer = asyncio.create_task(self.ws.close(POLICY_VIOLATION))
                raise WebSocketDisconnect(POLICY_VIOLATION) from None
            except RuntimeError as exc:  # sending after close
                raise WebSocketDisconnect(ABNORMAL_CLOSURE) from exc
        self.telemetry.websocket_sent(data)
