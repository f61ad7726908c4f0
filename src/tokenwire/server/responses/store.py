"""Responses as the server keeps them: each with its conversation, result and event log; a bounded, expiring store.

A :class:`Record` is one response. Its stream events are numbered by ``sequence_number`` and written to a
:class:`~tokenwire.server.resume.log.MessageLog`, the journal's design (entry ``i`` is event ``i``; append, read
from a number, wait for more, finish), so a stream read from the start, a background response read later, and one
resumed ``starting_after=N`` all read the same log. The :class:`ResponseStore` keeps records by id for
``previous_response_id``, ``GET`` and cancel: at most ``max_responses``, each for ``ttl`` seconds after it ended;
past the bound the oldest finished go first. Their event logs stay under ``budget_bytes``: past it, a finished
response's events are let go (oldest first; a background response's last), keeping its result; then whole
records go. No I/O; the clock is injectable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenwire.engine.interface import ChatMessage
from tokenwire.server.requests import tools
from tokenwire.server.requests.tools import ToolCall
from tokenwire.server.responses import protocol as rp
from tokenwire.server.responses.protocol import CreateRequest
from tokenwire.server.resume.log import Entry, MessageLog

FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass(slots=True)
class Record:
    """One response: what it was asked, what it said so far, and its events."""

    id: str
    request: CreateRequest
    history: tuple[ChatMessage, ...]  # the turns before this response's input (from previous_response_id)
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued, in_progress, completed, incomplete, cancelled, failed
    parts: list[str] = field(default_factory=list)  # the answer's text deltas
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    completed_at: float | None = None
    item_id: str = field(default_factory=lambda: rp.new_id("msg"))
    engine_id: str = ""
    tenant: str = ""
    log: MessageLog = field(init=False)
    task: asyncio.Task[None] | None = None
    call: ToolCall | None = None  # the answer is this tool call (not a message)
    message_open: bool = False  # the message item's added events were written
    readers: int = 0  # streams reading its events now
    ended_at: float | None = None  # monotonic, for expiry

    def __post_init__(self) -> None:
        self.log = MessageLog(self.id)

    @property
    def where(self) -> dict[str, Any]:
        """Where the answer's text is: the first output item's first content part."""
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    @property
    def done(self) -> bool:
        return self.status in ("completed", "incomplete", "cancelled", "failed")

    def conversation_input(self) -> tuple[ChatMessage, ...]:
        """What this response answers: the history and its own input (instructions apart)."""
        return (*self.history, *self.request.input)

    @property
    def conversation(self) -> tuple[ChatMessage, ...]:
        """What a response continuing this one starts from: the history, this input, and this answer."""
        said = tools.call_text(self.call.name, self.call.arguments) if self.call is not None else self.text
        answer = (ChatMessage("assistant", said),) if self.status != "failed" else ()
        return (*self.history, *self.request.input, *answer)

    def as_dict(self) -> dict[str, Any]:
        """The response object (``object: "response"``) as it stands."""
        output = []
        item_status = "in_progress" if self.status in ("queued", "in_progress") else "completed"
        if self.status in ("incomplete", "cancelled"):
            item_status = "incomplete"
        if self.call is not None:
            output.append(rp.function_call_item(self.item_id, self.call, item_status))
        elif self.message_open or (self.done and self.text):
            output.append(rp.message_item(self.item_id, self.text, item_status))
        return {
            "id": self.id,
            "object": "response",
            "created_at": int(self.created_at),
            "completed_at": int(self.completed_at) if self.completed_at else None,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete_details,
            "output": output,
            "output_text": self.text,
            "parallel_tool_calls": False,
            "usage": self.usage,
            **self.request.echo(),
        }

    def emit(self, kind: str, *, tokens: int = 0, **fields: Any) -> None:
        """Write the next stream event (its ``sequence_number`` is its place in the log)."""
        event: dict[str, Any] = {"type": kind, "sequence_number": self.log.last_seq + 1, **fields}
        if self.request.stream_id is not None:
            event["stream_id"] = self.request.stream_id
        final = kind in FINAL_EVENTS
        self.log.append(Entry(json.dumps(event, ensure_ascii=False, separators=(",", ":")), tokens, final))

    @staticmethod
    def event_type(data: str) -> str:
        """The ``type`` of an event as :meth:`emit` wrote it (always the first field)."""
        start = len('{"type":"')
        return data[start : data.index('"', start)]

    def ended(self, clock: Callable[[], float]) -> None:
        self.ended_at = clock()
        self.log.close()


class PreviousNotFound(LookupError):
    pass


@dataclass(slots=True)
class ResponseStore:
    """Records by id: at most ``max_responses``, each kept ``ttl`` seconds after it ended (running ones always)."""

    max_responses: int = 1000
    ttl: float = 3600.0
    budget_bytes: int = 64 << 20  # all event logs together
    clock: Callable[[], float] = time.monotonic
    _records: OrderedDict[str, Record] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: Record) -> None:
        self.sweep()
        self._records[record.id] = record
        while len(self._records) > self.max_responses and self._evict_one():
            pass
        self.trim()

    @property
    def nbytes(self) -> int:
        return sum(r.log.nbytes for r in self._records.values())

    def trim(self) -> None:
        """Keep the event logs under the budget: let go of finished responses' events that nobody reads, those of
        responses in the foreground first; then drop whole finished records, oldest first."""
        total = self.nbytes
        for background in (False, True):
            for record in list(self._records.values()):
                if total <= self.budget_bytes:
                    return
                if record.done and record.readers == 0 and record.request.background == background:
                    total -= record.log.nbytes
                    record.log.let_go()
        while total > self.budget_bytes and self._evict_one():
            total = self.nbytes

    def get(self, response_id: str) -> Record | None:
        record = self._records.get(response_id)
        if record is not None and self._expired(record):
            del self._records[response_id]
            return None
        return record

    def remove(self, response_id: str) -> Record | None:
        return self._records.pop(response_id, None)

    def sweep(self) -> None:
        for rid in [rid for rid, r in self._records.items() if self._expired(r)]:
            del self._records[rid]

    def _expired(self, record: Record) -> bool:
        return record.ended_at is not None and self.clock() - record.ended_at > self.ttl

    def _evict_one(self) -> bool:
        """Drop the oldest finished record nobody reads; False when there is none."""
        for rid, record in self._records.items():
            if record.done and record.readers == 0:
                del self._records[rid]
                return True
        return False
