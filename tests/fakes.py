"""A scripted Engine for server tests that need no model: fixed replies, errors on demand, a load gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from tokenwire.engine.interface import (
    EngineError,
    EngineErrorCode,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationStart,
    OutputKind,
    RequestOutput,
    Timings,
)


class FakeEngine:
    """Answers every request with ``reply`` split into ``pieces``; ``fail_with`` makes requests fail instead."""

    def __init__(
        self, reply: str = "Hello, world!", pieces: int = 3, delay: float = 0.0, honour_pause: bool = False
    ) -> None:
        self.reply = reply
        self.pieces = pieces
        self.delay = delay  # seconds between pieces
        self.aborted: set[str] = set()
        self.paused: set[str] = set()  # what the server paused (the fake goes on regardless, unless honour_pause)
        self.honour_pause = honour_pause  # a paused request makes nothing until unpaused, as in a real engine
        self.failure: str | None = None  # set by a test: the engine stopped working
        self.closed_early: set[str] = set()  # streams closed before their end: what a real engine aborts
        self.fail_with: EngineError | None = None
        self.load_gate = asyncio.Event()
        self.load_gate.set()
        self._ready = False
        self.requests: list[GenerationRequest] = []
        self.context_turns: int | None = None  # with truncate, turns beyond this many (oldest first) are dropped

    @property
    def model_name(self) -> str:
        return "fake-model"

    @property
    def model_aliases(self) -> tuple[str, ...]:
        return ("fake-alias",)

    @property
    def max_context(self) -> int:
        return 1024

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await self.load_gate.wait()
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def health(self) -> str | None:
        return self.failure

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        rid = request.request_id
        finished = False
        try:
            async for out in self._outputs(rid, self._dropped_turns(request)):
                finished = out.kind is OutputKind.FINISHED
                yield out
        finally:
            if not finished:
                self.closed_early.add(rid)

    def _dropped_turns(self, request: GenerationRequest) -> int:
        turns = [m for m in request.messages or () if m.role != "system"]
        if self.context_turns is None or len(turns) <= self.context_turns:
            return 0
        if not request.truncate:
            raise EngineError(EngineErrorCode.PROMPT_TOO_LONG, "the conversation does not fit the context", "messages")
        return len(turns) - self.context_turns

    async def _outputs(self, rid: str, dropped: int) -> AsyncGenerator[RequestOutput, None]:
        yield RequestOutput(rid, OutputKind.STARTED, start=GenerationStart(7, dropped), prompt_tokens=7)
        step = max(1, len(self.reply) // self.pieces)
        chunks = [self.reply[i : i + step] for i in range(0, len(self.reply), step)]
        sent = 0
        for chunk in chunks:
            await asyncio.sleep(self.delay)
            while self.honour_pause and rid in self.paused and rid not in self.aborted:
                await asyncio.sleep(0.005)
            if rid in self.aborted:
                break
            sent += 1
            yield RequestOutput(rid, OutputKind.DELTA, text=chunk, num_tokens=1)
        yield RequestOutput(
            rid,
            OutputKind.FINISHED,
            finish_reason=FinishReason.CANCELLED if rid in self.aborted else FinishReason.STOP,
            prompt_tokens=7,
            completion_tokens=sent,
            timings=Timings(0.0, 1.0, 2.0, 100.0),
        )

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def pause(self, request_id: str) -> None:
        self.paused.add(request_id)

    def unpause(self, request_id: str) -> None:
        self.paused.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, max_batch_size=1)
