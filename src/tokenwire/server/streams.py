"""Reading an engine stream with deadlines: for batch flushes (WebSocket) and keep-alives (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from tokenwire.engine.interface import RequestOutput


async def with_deadlines(
    stream: AsyncIterator[RequestOutput], deadline: Callable[[], float | None] | None
) -> AsyncIterator[RequestOutput | None]:
    """Yield the stream's items, and ``None`` whenever ``deadline()`` (monotonic seconds) passes first.

    The pending ``__anext__`` is awaited with ``asyncio.wait`` rather than ``wait_for`` so that a deadline
    never cancels it (which would close the stream and abort the request).
    """
    if deadline is None:
        async for item in stream:
            yield item
        return
    pending: asyncio.Future[RequestOutput] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            due = deadline()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
