"""One WebSocket generation: engine outputs in, numbered protocol messages out, into its journal.

The producer runs as its own task and never touches a socket: whichever connection holds the journal sends
what it holds (websocket.py). So a generation outlives a dropped connection, and a resumed one goes on from
where the client stopped reading. Cancelling the task closes the engine stream, which aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tokenwire.engine.interface import Engine, EngineError, ErrorCode, GenerationRequest, OutputKind, RequestOutput
from tokenwire.server import messages
from tokenwire.server.batching import Coalescer
from tokenwire.server.journal import Entry, Journal, Registry
from tokenwire.server.protocol import BatchPolicy
from tokenwire.server.streams import with_deadlines
from tokenwire.server.telemetry import Telemetry

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
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.registry = registry
        self.telemetry = telemetry
        self.coalescer = Coalescer(batch) if batch else None
        self._silent_tokens = 0  # generated tokens whose bytes never completed a character: no message of their own

    @property
    def _seq(self) -> int:
        return self.journal.last_seq + 1

    def _emit(self, message: dict[str, Any], tokens: int = 0, final: bool = False) -> None:
        if final:
            tokens += self._silent_tokens
        self.journal.append(Entry(messages.encode(message), tokens, final))

    async def run(self, request: GenerationRequest, connection: str) -> None:
        gen_id = self.journal.gen_id
        coalescer = self.coalescer
        trace = self.telemetry.trace(request.request_id, connection, "websocket")
        try:
            stream = self.engine.generate(request)
            async with contextlib.aclosing(stream):
                async for out in with_deadlines(stream, coalescer.deadline if coalescer and coalescer.timed else None):
                    if out is None:  # a batch deadline passed with no new output
                        self._flush()
                    elif out.kind is OutputKind.STARTED:
                        dropped = out.start.truncated_messages if out.start else 0
                        model, token = self.engine.model_name, self.journal.resume_token
                        self._emit(messages.started(gen_id, model, out.prompt_tokens, token, dropped))
                    elif out.kind is OutputKind.DELTA:
                        trace.delta(out.text, out.num_tokens)
                        self._deliver(out)
                    else:
                        if out.text:
                            trace.delta(out.text, out.num_tokens)
                        trace.finished(out)
                        self._deliver(out)
                        self._flush()
                        assert out.finish_reason is not None
                        done = messages.complete(
                            gen_id,
                            self._seq,
                            out.finish_reason,
                            out.prompt_tokens,
                            out.completion_tokens,
                            out.timings,
                            out.cached_tokens,
                        )
                        self._emit(done, final=True)
        except EngineError as err:
            trace.failed(err.code.value)
            self._emit(messages.error(err.code, err.message, gen_id, err.param, seq=self._seq), final=True)
        except asyncio.CancelledError:  # aborted: the client went for good, or the server stops
            if not self.journal.finished:
                self._flush()  # text generated before the abort still reaches a client that is there to read it
        except Exception as exc:  # a bug: report it on this generation, keep the connection and the server
            log.exception("generation %s failed", request.request_id)
            trace.failed(ErrorCode.GENERATION_FAILED.value)
            failed = messages.error(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}", gen_id, seq=self._seq)
            self._emit(failed, final=True)
        finally:
            trace.abandoned()
            self.journal.close()
            self.registry.finished(self.journal)

    def _deliver(self, out: RequestOutput) -> None:
        if not out.text:
            self._silent_tokens += out.num_tokens
            return
        if self.coalescer is None:
            self._emit(messages.token(self.journal.gen_id, self._seq, out.text, out.num_tokens, False), out.num_tokens)
            return
        if self.coalescer.would_overflow(out.num_tokens):
            self._flush()
        self.coalescer.add(out.text, out.num_tokens, time.monotonic())
        if self.coalescer.due(time.monotonic()):
            self._flush()

    def _flush(self) -> None:
        coalescer = self.coalescer
        if coalescer is None or coalescer.empty:
            return
        text, tokens = coalescer.take()
        if text:
            self._emit(messages.token(self.journal.gen_id, self._seq, text, tokens, batched=True), tokens)
        else:
            self._silent_tokens += tokens
