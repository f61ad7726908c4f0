"""One WebSocket generation: engine outputs in, numbered protocol messages out, into its journal.

The producer reads the engine stream as every door does (streaming/streams.py's ``door_events``: started, deltas
with their token ids, the end or a failure, and a tick when a batch is due), keeps nothing of the trace itself,
and only turns those events into this protocol's messages. It runs as its own task and never touches a socket:
whichever connection holds the journal sends what it holds (connection.py). So a generation outlives a dropped
connection, and a resumed one goes on from where the client stopped reading. Cancelling the task closes the
engine stream, which aborts the request.

Flow control (flow.py): a generation runs at most ``FlowPolicy.max_unsent_tokens`` ahead of its reader (tokens generated
but not yet written to the reader's socket, which takes no more while ``max_socket_bytes`` are unread in it).
Past that, or as soon as the reader is gone (the connection dropped), the producer pauses it in the engine: it
leaves the running batch and costs nothing until the reader has caught up to half that distance, or a ``resume``
brings a reader back. Before that, a reader that falls behind gets its
text merged into fewer, larger messages of the type it already receives (``token`` stays ``token``, carrying the
count in ``tokens``), so a slow link is not flooded with small frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from tokenwire.engine.interface import Engine, GenerationRequest, RequestOutput
from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.resume.journal import Journal, Registry
from tokenwire.server.resume.log import Entry
from tokenwire.server.streaming.flow import Change, FlowPolicy, Valve
from tokenwire.server.streaming.streams import Delta, Done, KeepAlive, Started, StreamEvent, door_events
from tokenwire.server.telemetry import Telemetry
from tokenwire.server.ws import messages
from tokenwire.server.ws.batching import Coalescer
from tokenwire.server.ws.protocol import BatchPolicy

log = logging.getLogger(__name__)


class Producer:
    """Writes one generation's messages into ``journal``: started (seq 0), token/tokens, complete or error."""

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        registry: Registry,
        telemetry: Telemetry,
        batch: BatchPolicy | None,
        flow: FlowPolicy | None = None,
        continuing: bool = False,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.registry = registry
        self.telemetry = telemetry
        self.coalescer = Coalescer(batch) if batch else None
        self.flow = flow or FlowPolicy()
        self.continuing = continuing  # it goes on from a journal begun elsewhere: its started message was sent
        self.prompt_tokens = 0
        self.valve = Valve(self.flow.unsent_tokens)
        self.pauses = 0
        self._silent_tokens = 0  # generated tokens whose bytes never completed a character: no message of their own
        self._silent_ids: tuple[int, ...] = ()
        self._held_text = ""  # text waiting for a reader that is behind (see FlowPolicy.coalesce_after)
        self._held_tokens = 0
        self._held_ids: list[int] = []
        self._held_batched = False

    @property
    def _seq(self) -> int:
        return self.journal.last_seq + 1

    def _emit(self, message: dict[str, Any], tokens: int = 0, final: bool = False, ids: tuple[int, ...] = ()) -> None:
        """Journal one message; ``ids``: the token ids whose text it carries (a journal shared across replicas keeps
        them, so that another replica can go on with the generation after them)."""
        if final:
            tokens += self._silent_tokens
            ids = self._silent_ids + ids
        self.journal.append(Entry(messages.encode(message), tokens, final, ids))

    async def run(self, request: GenerationRequest, connection: str) -> None:
        """Read the engine's stream as every door does (streaming/streams.py's door_events, which keeps the trace)
        and journal it as this door's messages."""
        gen_id = self.journal.gen_id
        coalescer = self.coalescer
        trace = self.telemetry.trace(request.request_id, connection, "websocket")
        self.journal.watch(self._regulate)
        due = coalescer.deadline if coalescer and coalescer.timed else None  # a batch to flush
        try:
            async with contextlib.aclosing(door_events(self.engine.generate(request), trace, due=due)) as events:
                try:
                    async for ev in events:
                        self._journal(ev)
                except Exception:
                    trace.failed(ErrorCode.GENERATION_FAILED.value)  # before closing the events counts it abandoned
                    raise
        except asyncio.CancelledError:  # aborted: the client went for good, or the server stops
            if not self.journal.finished:
                self._flush()  # text generated before the abort still reaches a client that is there to read it
                self._release_held()
        except Exception as exc:  # a bug: report it on this generation, keep the connection and the server
            log.exception("generation %s failed", request.request_id)
            self._release_held()
            failed = messages.error(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}", gen_id, seq=self._seq)
            self._emit(failed, final=True)
        finally:
            self.journal.watch(None)
            self.journal.close()
            self.registry.finished(self.journal)

    def _journal(self, ev: StreamEvent) -> None:
        """One event of the engine's stream, as this door's messages."""
        if isinstance(ev, KeepAlive):  # a batch deadline passed with no new output
            self._flush()
        elif isinstance(ev, Started):
            self._started(ev.output)
        elif isinstance(ev, Delta):
            self._deliver(ev.text, ev.tokens, ev.ids)
        elif isinstance(ev, Done):
            self._finished(ev.output)
        else:
            self._failed(ev.error)

    def _started(self, out: RequestOutput) -> None:
        """The engine took the request: ``started`` (seq 0), unless it goes on from a journal begun elsewhere."""
        self.prompt_tokens = out.prompt_tokens
        if self.continuing:
            return
        dropped = out.start.truncated_messages if out.start else 0
        self.journal.began(out.start.prompt_ids if out.start else ())
        model, token = self.engine.model_name, self.journal.resume_token
        self._emit(messages.started(self.journal.gen_id, model, out.prompt_tokens, token, dropped))

    def _finished(self, out: RequestOutput) -> None:
        """The end (its text came as a Delta before it): whatever was held back, then ``complete``."""
        self._flush()
        self._release_held()
        assert out.finish_reason is not None
        done = messages.complete(
            self.journal.gen_id,
            self._seq,
            out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
            out.timings,
            out.cached_tokens,
            self._silent_tokens,
        )
        self._emit(done, final=True)

    def _failed(self, err: RequestError) -> None:
        """The engine failed the request: what was generated goes out, then ``error`` (the last message)."""
        self._flush()
        self._release_held()
        message = messages.error(
            err.code, err.message, self.journal.gen_id, err.param, seq=self._seq, retry_after=err.retry_after
        )
        self._emit(message, final=True)

    @property
    def used_tokens(self) -> int:
        """Prompt and generated tokens so far (what a per-key budget is charged)."""
        return self.prompt_tokens + self.journal.tokens + self._silent_tokens + self._held_tokens

    # -- flow control
    def _regulate(self) -> None:
        """Pause the generation when its reader is gone or too far behind; let it go on once the reader caught up.
        Called after every message and whenever the reader moves (journal.on_progress)."""
        journal, flow = self.journal, self.flow
        if journal.finished:
            return
        gone = journal.holder is None
        if self._held_text and not gone and journal.unsent_messages < flow.coalesce_after:
            self._release_held()  # the reader caught up: what waited goes out as one message
        behind = journal.unsent_tokens + self._held_tokens
        change = self.valve.update(behind, force=gone and flow.pause_orphans, hold=gone)
        if change is Change.PAUSE:
            self.pauses += 1
            self._release_held()  # the reader (now or on resume) gets all that was generated
            self.engine.pause(journal.engine_id)
            self.telemetry.flow_paused()
        elif change is Change.GO_ON:
            self.engine.unpause(journal.engine_id)

    def _send_text(self, text: str, tokens: int, batched: bool, ids: tuple[int, ...]) -> None:
        """One message of text, unless the reader is behind: then it waits and merges with the next."""
        if self._held_text or self.journal.unsent_messages >= self.flow.coalesce_after:
            self._held_text += text
            self._held_tokens += tokens
            self._held_ids.extend(ids)
            self._held_batched = self._held_batched or batched
            if self.journal.unsent_messages < self.flow.coalesce_after:
                self._release_held()
        else:
            self._emit(messages.token(self.journal.gen_id, self._seq, text, tokens, batched), tokens, ids=ids)
        self._regulate()

    def _release_held(self) -> None:
        if not self._held_text:
            return
        text, tokens, batched, ids = self._held_text, self._held_tokens, self._held_batched, tuple(self._held_ids)
        self._held_text, self._held_tokens, self._held_batched = "", 0, False
        self._held_ids.clear()
        self._emit(messages.token(self.journal.gen_id, self._seq, text, tokens, batched), tokens, ids=ids)

    def _deliver(self, text: str, tokens: int, ids: tuple[int, ...]) -> None:
        if not text:
            self._silent_tokens += tokens
            self._silent_ids += ids
            return
        if self.coalescer is None:
            self._send_text(text, tokens, False, ids)
            return
        if self.coalescer.would_overflow(tokens):
            self._flush()
        self.coalescer.add(text, tokens, time.monotonic(), ids)
        if self.coalescer.due(time.monotonic()):
            self._flush()

    def _flush(self) -> None:
        coalescer = self.coalescer
        if coalescer is None or coalescer.empty:
            return
        text, tokens, ids = coalescer.take()
        if text:
            self._send_text(text, tokens, True, ids)
        else:
            self._silent_tokens += tokens
            self._silent_ids += ids


def restarter(
    engine: Engine, registry: Registry, telemetry: Telemetry, flow: FlowPolicy | None = None
) -> Callable[[Journal, GenerationRequest, dict[str, Any] | None], None]:
    """How this door goes on with a generation another replica began and died running (resume/service.py's
    take-over): a producer that continues its journal, each next message with the next seq."""

    def restart(journal: Journal, request: GenerationRequest, batch: dict[str, Any] | None) -> None:
        policy = BatchPolicy(**batch) if batch else None
        producer = Producer(engine, journal, registry, telemetry, policy, flow, continuing=True)
        journal.produced_by(asyncio.create_task(producer.run(request, request.connection or "")))

    return restart
