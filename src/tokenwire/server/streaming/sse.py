"""Server-Sent Events for the HTTP doors (OpenAI completions, Responses): framing, flow control, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenwire.server.streaming.backlog import Backlog
from tokenwire.server.streaming.flow import SOCKET_UNREAD, Change, Valve

T = TypeVar("T")


# Characters JSON leaves as they are but that common SSE readers take for line ends (Python's str.splitlines, which
# httpx's aiter_lines follows): written as JSON escapes, they decode to the same text and keep each event one line.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE message: ``data: <json>`` (``data`` encoded, or a string already JSON, or ``[DONE]``), after
    ``event: <name>`` when named. The JSON is one line for every reader: control characters are escaped by JSON,
    and U+0085, U+2028 and U+2029 (which JSON has only inside strings) here."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    payload = payload.translate(_LINE_BREAKING)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """Streams ``events`` as ``text/event-stream``; a client disconnect cancels it (and so closes ``events``).

    Flow control (flow.py): while the socket holds ``SOCKET_UNREAD.high`` bytes the client has not taken
    (backlog.py), or a write stays blocked for ``STALL_S`` (where the backlog cannot be read), the generation is
    paused (``pause``); it goes on (``unpause``) when the socket holds ``SOCKET_UNREAD.low`` and the write has
    completed. So a stalled reader costs no compute, and the text waiting for it is bounded."""

    STALL_S = 0.2

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        pause: Callable[[], None] | None = None,
        unpause: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._pause = pause
        self._unpause = unpause
        self._writing_since: float | None = None
        self._backlog: Backlog | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._backlog = Backlog.of(scope)

        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with contextlib.aclosing(self._events) as events:
                async for chunk in events:
                    self._writing_since = time.monotonic()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self._writing_since = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        watch = asyncio.create_task(self._watch()) if self._pause is not None else None
        try:
            await until_disconnect(stream(), receive)
        finally:
            if watch is not None:
                watch.cancel()

    async def _watch(self) -> None:
        """Pause the generation while a write is stalled; let it go on when the write completes."""
        assert self._pause is not None and self._unpause is not None
        backlog = self._backlog
        valve = Valve(SOCKET_UNREAD)
        while True:
            await asyncio.sleep(self.STALL_S / 2)
            since = self._writing_since
            blocked = since is not None and time.monotonic() - since >= self.STALL_S
            unread = backlog.unread_bytes() if backlog is not None and backlog.known else 0
            change = valve.update(unread, force=blocked, hold=blocked)
            if change is Change.PAUSE:
                self._pause()
            elif change is Change.GO_ON:
                self._unpause()


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return None
    with contextlib.suppress(OSError):  # the client went away while we wrote: nothing left to do
        return task.result()
    return None
