"""Reading an engine stream: with deadlines (batch flushes, keep-alives), and as the events every door renders."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenwire.engine.interface import EngineError, OutputKind, RequestOutput
from tokenwire.server.requests.errors import ErrorCode, RequestError, wire_error
from tokenwire.server.telemetry import Trace

T = TypeVar("T")


async def with_deadlines(
    stream: AsyncIterator[T], deadline: Callable[[], float | None] | None
) -> AsyncGenerator[T | None, None]:
    """Yield the stream's items, and ``None`` whenever ``deadline()`` (monotonic seconds) passes first.

    The pending ``__anext__`` is awaited with ``asyncio.wait`` rather than ``wait_for`` so that a deadline
    never cancels it (which would close the stream and abort the request).
    """
    if deadline is None:
        async for item in stream:
            yield item
        return
    pending: asyncio.Future[T] | None = None
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


# -- one adapter from an engine stream to a door's events


@dataclass(slots=True, frozen=True)
class Started:
    """The engine took the request (prompt tokens, truncation, the prompt's ids: ``output``). Only a door that reads
    the stream from its first item sees it (the HTTP doors wait for STARTED themselves, before any byte)."""

    output: RequestOutput


@dataclass(slots=True, frozen=True)
class Delta:
    """New text (``tokens`` generated tokens' worth, ``ids`` their token ids; text may be empty while a character is
    incomplete)."""

    text: str
    tokens: int
    ids: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class KeepAlive:
    """Nothing came for the keep-alive interval: a door may send a comment or heartbeat."""


@dataclass(slots=True, frozen=True)
class Done:
    """The generation finished; ``output`` has the finish reason, usage and timings (its text came as a Delta)."""

    output: RequestOutput


@dataclass(slots=True, frozen=True)
class Failed:
    """The generation failed, in wire terms."""

    error: RequestError


StreamEvent = Started | Delta | KeepAlive | Done | Failed


async def door_events(
    stream: AsyncIterator[RequestOutput],
    trace: Trace,
    keepalive: float = 0.0,
    due: Callable[[], float | None] | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """An engine stream as the events every door renders: ``Started`` (if the stream still has its STARTED),
    ``Delta`` per text delta, a ``KeepAlive`` whenever ``keepalive`` seconds pass with nothing else (0: never) or
    the door's own deadline ``due()`` passes (monotonic seconds, None: none now; a batch to flush), then exactly one
    ``Done`` or ``Failed``. The trace (metrics, logs, dashboard) is kept here, so doors do not repeat it; a door
    that stops reading before the end (its client left) counts as abandoned, and closing these events closes
    ``stream`` (which aborts the request in the engine)."""
    next_ping = time.monotonic() + keepalive

    def deadline() -> float | None:
        own = due() if due is not None else None
        if keepalive <= 0:
            return own
        return next_ping if own is None else min(own, next_ping)

    try:
        async for out in with_deadlines(stream, deadline if keepalive > 0 or due is not None else None):
            next_ping = time.monotonic() + keepalive
            if out is None:
                yield KeepAlive()
                continue
            if out.kind is OutputKind.STARTED:
                yield Started(out)
                continue
            if out.text or out.num_tokens:
                if out.text:
                    trace.delta(out.text, out.num_tokens)
                yield Delta(out.text, out.num_tokens, out.token_ids)
            if out.kind is OutputKind.FINISHED:
                trace.finished(out)
                yield Done(out)
                return
        trace.failed(ErrorCode.GENERATION_FAILED.value)
        yield Failed(RequestError(ErrorCode.GENERATION_FAILED, "the generation ended without a result"))
    except EngineError as err:
        wire = wire_error(err)
        trace.failed(wire.code.value)
        yield Failed(wire)
    finally:
        trace.abandoned()  # a no-op unless the door stopped reading before the end
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()  # a door that stops early aborts the request
