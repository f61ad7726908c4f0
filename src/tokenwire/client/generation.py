"""One generation as the caller sees it: an async iterator of :class:`Delta`, then its end (finish reason,
usage, timings) or a typed exception. The connection (``connection.py``) fills its bounded queue; the caller
drains it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tokenwire.client.errors import TokenwireError, error_from
from tokenwire.client.messages import (
    Delta,
    FinishReason,
    Timings,
    Usage,
    parse_delta,
    parse_finish_reason,
    parse_timings,
    parse_usage,
)

if TYPE_CHECKING:
    from tokenwire.client.connection import Client


class Generation:
    """An answer being streamed::

        gen = client.generate("Tell me a joke", max_tokens=64)
        async for delta in gen:
            print(delta.text, end="", flush=True)
        print(gen.finish_reason, gen.usage, gen.timings)

    The request is sent when iteration starts. Breaking out of the loop (or ``await gen.cancel()``) cancels it
    on the server. An ``error`` from the server raises its :class:`TokenwireError` subclass from the loop.
    Across a dropped connection the client resumes the generation, and the loop sees every delta once, in
    order.
    """

    def __init__(self, client: Client, gen_id: str, request: dict[str, Any] | None, buffer: int) -> None:
        self.id = gen_id
        self.request = request  # the generate message; None for a generation taken over with Client.resume
        self.session: str | None = None  # the hello session of the connection it was started on
        self.resume_token: str | None = None
        self.prompt_tokens: int | None = None
        self.truncated_messages = 0  # turns left out by truncate="auto"
        self.text = ""  # the text delivered so far
        self.finish_reason: FinishReason | str | None = None
        self.usage: Usage | None = None
        self.timings: Timings | None = None
        self.last_seq = -1  # the newest seq received from the server (delivered or waiting in the queue)
        self._client = client
        # Bounded: when the caller reads more slowly than the server sends, the connection's reader waits, the
        # socket fills, and the server pauses the generation (its flow control): nothing is dropped.
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(buffer)
        self._sent = False
        self._ended = False  # the caller has seen the end (or the generation was abandoned)
        self.cancel_requested = False
        self.detached = False  # the connection dropped; a resume is on its way
        self._error: TokenwireError | None = None  # the connection is gone for good: raised after what is queued

    @property
    def done(self) -> bool:
        return self._ended

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        try:
            while (delta := await self.next()) is not None:
                yield delta
        finally:
            if not self._ended:  # the caller left the loop early (break, an exception, a cancelled task)
                await self._abandon()

    async def next(self) -> Delta | None:
        """The next delta; None once the generation is complete. Raises the server's error, or
        :class:`ConnectionFailed` when the connection could not be brought back in time."""
        if self._ended:
            return None
        if not self._sent:
            self._sent = True
            try:
                await self._client._start(self)
            except BaseException:
                self._ended = True  # nothing will come: later calls end at once
                raise
        while True:
            if self._error is not None and self._queue.empty():
                self._ended = True
                raise self._error
            msg = await self._queue.get()
            kind = msg.get("type")
            if kind in ("token", "tokens"):
                delta = parse_delta(msg)
                self.text += delta.text
                return delta
            if kind == "complete":
                self._ended = True
                self.finish_reason = parse_finish_reason(msg)
                self.usage = parse_usage(msg)
                self.timings = parse_timings(msg)
                return None
            if kind == "error":
                self._ended = True
                raise error_from(msg)

    async def collect(self) -> str:
        """Read the whole answer; its text."""
        while await self.next() is not None:
            pass
        return self.text

    async def cancel(self) -> None:
        """Ask the server to stop; the loop then ends with ``finish_reason`` ``cancelled`` (and whatever was
        already on its way). Sent after the resume if the connection is down."""
        if self._ended or self.cancel_requested:
            return
        self.cancel_requested = True
        if self._sent and not self.detached:
            await self._client._send_quietly({"type": "cancel", "id": self.id})

    async def _abandon(self) -> None:
        """The caller no longer reads: cancel on the server, drop what arrives for it."""
        self._ended = True
        self._client._forget(self)
        while not self._queue.empty():  # unblocks the reader if it was waiting on this queue
            self._queue.get_nowait()
        if self._sent:
            with contextlib.suppress(Exception):
                await self._client._send_quietly({"type": "cancel", "id": self.id})

    # -- called by the connection
    def _failed(self, error: TokenwireError) -> None:
        """The connection is gone and could not be brought back: the caller gets what was queued, then this."""
        self._error = error
        if not self._queue.full():
            self._queue.put_nowait({"type": "_wake"})  # a caller waiting on an empty queue sees the error
