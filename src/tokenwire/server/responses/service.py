"""Running responses: one task per response turns its engine stream into numbered events (store.py's log).

Both Responses doors (HTTP with SSE, and the WebSocket mode) start responses here and read their logs, so a
stream, a background response fetched later and a stream resumed ``starting_after=N`` see the same events. A
response that continues another (``previous_response_id``) starts from that one's conversation; instructions are
not carried over (as OpenAI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from tokenwire.engine.interface import (
    ChatMessage,
    Engine,
    EngineError,
    GenerationRequest,
    OutputKind,
    RequestOutput,
)
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.requests import tools
from tokenwire.server.requests.errors import ErrorCode, RequestError, wire_error
from tokenwire.server.requests.http_errors import openai_error
from tokenwire.server.responses import protocol as rp
from tokenwire.server.responses.protocol import CreateRequest
from tokenwire.server.responses.store import Record, ResponseStore
from tokenwire.server.streaming.streams import Delta, Done, Failed, door_events
from tokenwire.server.telemetry import Telemetry, Trace

log = logging.getLogger(__name__)

DRAINING = "the server is shutting down; try again later"


class Responses:
    """Starts, runs, cancels and drains responses; keeps the stored ones (``store``)."""

    def __init__(
        self,
        engine: Engine,
        telemetry: Telemetry,
        store: ResponseStore | None = None,
        key_limits: KeyLimits | None = None,
    ) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.store = store or ResponseStore()
        self.key_limits = key_limits or KeyLimits()
        self._running: dict[str, Record] = {}
        self._ids = itertools.count(1)
        self._draining = False

    # -- the drain (lifecycle.Door)
    @property
    def in_flight(self) -> int:
        return len(self._running)

    def stop_accepting(self) -> None:
        self._draining = True

    async def drain(self, timeout: float = 2.0) -> None:
        """Every response still running ends as failed with ``shutting_down``."""
        self._draining = True
        for record in list(self._running.values()):
            self.engine.abort(record.engine_id)
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- lookups
    def get(self, response_id: str, tenant: str) -> Record | None:
        """A stored response this tenant may see (another key's responses do not exist for it)."""
        record = self.store.get(response_id)
        if record is None or record.tenant != tenant:
            return None
        return record

    def history(
        self, request: CreateRequest, tenant: str, local: Mapping[str, Record] | None = None
    ) -> tuple[ChatMessage, ...]:
        """The conversation ``previous_response_id`` names (from the store, or this connection's own responses)."""
        prev_id = request.previous_response_id
        if prev_id is None:
            return ()
        record = (local or {}).get(prev_id) or self.get(prev_id, tenant)
        if record is None or record.tenant != tenant:
            raise openai_error(
                400,
                f"the previous response {prev_id!r} was not found: it expired, was not stored (store: false), or "
                "never existed; send the whole conversation as input instead",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        if not record.done:
            raise openai_error(
                400,
                f"the previous response {prev_id!r} is still running; continue it once it has ended",
                code=ErrorCode.INVALID_REQUEST.value,
                param="previous_response_id",
            )
        return record.conversation

    # -- running
    async def start(
        self,
        request: CreateRequest,
        *,
        tenant: str,
        connection: str,
        local: Mapping[str, Record] | None = None,
    ) -> Record:
        """Admit a response and start it: its first events are written before this returns. Raises
        :class:`~tokenwire.server.requests.errors.RequestError` (with its HTTP status) for one that cannot start
        (nothing is stored then)."""
        if self._draining:
            raise RequestError(ErrorCode.SHUTTING_DOWN, DRAINING)
        if not self.engine.ready:
            message = "the model is still loading; try again shortly"
            raise RequestError(ErrorCode.OVERLOADED, message, retry_after=1.0)
        history = self.history(request, tenant, local)
        record = Record(rp.new_id("resp"), request, history, tenant=tenant)
        record.engine_id = f"responses-{next(self._ids)}-{record.id}"
        messages = list(record.conversation_input())
        if request.instructions:
            messages.insert(0, ChatMessage("system", request.instructions))
        engine_request = GenerationRequest(
            request_id=record.engine_id,
            params=request.params,
            messages=tuple(messages),
            truncate=request.truncate,
            tools=tools.for_template(request.tools),
            tools_text=request.tools_text(),
            tenant=tenant,
            connection=connection,
        )
        try:
            self.key_limits.acquire(tenant)
        except RequestError as err:
            self.telemetry.error(err.code.value)
            raise
        stream = self._tracked(engine_request, record)
        trace = self.telemetry.trace(record.engine_id, connection, "responses")
        try:
            await anext(stream)  # STARTED: tokenized and queued; prompt errors surface here
        except EngineError as err:
            wire = wire_error(err)
            if wire.param == "messages":  # the conversation this API was sent is its "input"
                wire = RequestError(wire.code, wire.message, "input", wire.retry_after)
            trace.failed(wire.code.value)
            await stream.aclose()
            raise wire from None
        record.status = "queued" if request.background else "in_progress"
        record.emit("response.created", response=record.as_dict())
        if request.store:
            self.store.add(record)
        record.task = asyncio.create_task(self._run(record, stream, trace))
        return record

    def cancel(self, record: Record) -> None:
        """Stop a running response: it ends with status ``cancelled`` (its events end with ``response.incomplete``)."""
        if not record.done:
            self.engine.abort(record.engine_id)

    async def _tracked(self, request: GenerationRequest, record: Record) -> AsyncGenerator[RequestOutput, None]:
        """The engine stream, counted in flight (for the drain) and against the key's limits until it ends."""
        self._running[record.id] = record
        used = 0
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as stream:
                async for out in stream:
                    used += out.prompt_tokens if out.kind is OutputKind.STARTED else out.num_tokens
                    yield out
        finally:
            self._running.pop(record.id, None)
            self.key_limits.release(request.tenant, used)

    async def _run(self, record: Record, stream: AsyncGenerator[RequestOutput, None], trace: Trace) -> None:
        record.status = "in_progress"
        record.emit("response.in_progress", response=record.as_dict())
        calls = tools.CallStream(record.request.tools) if record.request.tools else None  # is the answer a call?
        if calls is None:
            self._open_message(record)
        status, details, error = "failed", None, None
        try:
            async for ev in door_events(stream, trace):
                if isinstance(ev, Delta) and ev.text:
                    pieces = calls.feed(ev.text) if calls is not None else [("text", ev.text)]
                    for kind, piece in pieces:
                        self._write(record, calls, kind, piece, ev.tokens)
                elif isinstance(ev, Done):
                    status, details, error = self._finished(record, ev.output)
                elif isinstance(ev, Failed):
                    error = {"code": ev.error.code.value, "message": ev.error.message}
        except asyncio.CancelledError:
            status, error = "cancelled", None
            raise
        finally:
            if calls is not None:
                for kind, piece in calls.finish():
                    self._write(record, calls, kind, piece, 0)
                record.call = calls.call()
            self._end(record, status, details, error)

    @classmethod
    def _write(cls, record: Record, calls: tools.CallStream | None, kind: str, piece: str, tokens: int) -> None:
        """One piece of the answer as events: message text, a call's start, or a piece of its arguments."""
        where: dict[str, Any] = {"item_id": record.item_id, "output_index": 0}
        if kind == "text":
            if not record.message_open:
                cls._open_message(record)
            record.parts.append(piece)
            record.emit("response.output_text.delta", tokens=tokens, **where, content_index=0, delta=piece, logprobs=[])
        elif kind == "name" and calls is not None:
            started = tools.ToolCall(piece, "", calls.call_id)
            item = rp.function_call_item(record.item_id, started, "in_progress")
            record.emit("response.output_item.added", output_index=0, item=item)
        else:
            record.emit("response.function_call_arguments.delta", tokens=tokens, **where, delta=piece)

    @staticmethod
    def _open_message(record: Record) -> None:
        item = rp.message_item(record.item_id, "", "in_progress")
        record.emit("response.output_item.added", output_index=0, item=item)
        record.emit("response.content_part.added", **record.where, part=rp.output_text_part(""))
        record.message_open = True

    def _finished(self, record: Record, out: RequestOutput) -> tuple[str, dict[str, str] | None, dict[str, str] | None]:
        record.usage = rp.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
        status, details = rp.status_of(out.finish_reason)
        if status == "cancelled" and self._draining:
            return "failed", None, {"code": ErrorCode.SHUTTING_DOWN.value, "message": DRAINING}
        return status, details, None

    def _end(self, record: Record, status: str, details: dict[str, str] | None, error: dict[str, str] | None) -> None:
        """Write the closing events (item, part, text done; then the response's last event) and keep the result."""
        item_status = "completed" if status == "completed" else "incomplete"
        if record.call is not None:
            where: dict[str, Any] = {"item_id": record.item_id, "output_index": 0}
            call = record.call
            record.emit("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments)
            item = rp.function_call_item(record.item_id, call, item_status)
            record.emit("response.output_item.done", output_index=0, item=item)
        elif record.message_open:
            text = record.text
            record.emit("response.output_text.done", **record.where, text=text, logprobs=[])
            record.emit("response.content_part.done", **record.where, part=rp.output_text_part(text))
            item = rp.message_item(record.item_id, text, item_status)
            record.emit("response.output_item.done", output_index=0, item=item)
        record.status, record.incomplete_details, record.error = status, details, error
        record.completed_at = time.time() if status == "completed" else None
        last = {"completed": "response.completed", "failed": "response.failed"}.get(status, "response.incomplete")
        record.emit(last, response=record.as_dict())
        record.ended(self.store.clock)


async def read_events(record: Record, after: int = -1) -> AsyncGenerator[str, None]:
    """A response's events after ``sequence_number`` ``after``, as they come, until its last one."""
    seq = after
    record.readers += 1
    try:
        while True:
            for entry in record.log.read(seq + 1):
                seq += 1
                yield entry.data
            if record.log.finished and seq >= record.log.last_seq:
                return
            await record.log.wait_beyond(seq)
    finally:
        record.readers -= 1
