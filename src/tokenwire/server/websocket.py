"""One WebSocket connection: read frames, run generations concurrently, write messages in order.

Each generation is an asyncio task reading the engine's output stream. All writes go through one lock,
so messages of different generations interleave whole. A client that stops reading blocks its own
writes; after ``slow_consumer_timeout`` the connection is closed and its generations are aborted.
Disconnect and cancel are ordinary paths: closing a generation's stream aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenwire.engine.interface import (
    Engine,
    EngineError,
    ErrorCode,
    GenerationRequest,
    OutputKind,
    RequestOutput,
)
from tokenwire.server import messages
from tokenwire.server.batching import Coalescer
from tokenwire.server.protocol import (
    Cancel,
    Generate,
    Limits,
    Ping,
    Pong,
    ProtocolError,
    Resume,
    parse_message,
)
from tokenwire.server.streams import with_deadlines
from tokenwire.server.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ConnectionSettings:
    limits: Limits = field(default_factory=Limits)
    heartbeat_interval: float = 30.0  # seconds between server pings; 0 disables them
    slow_consumer_timeout: float = 30.0  # a send blocked this long closes the connection


class _SlowConsumer(Exception):
    pass


class Connection:
    def __init__(self, ws: WebSocket, engine: Engine, settings: ConnectionSettings, telemetry: Telemetry) -> None:
        self.ws = ws
        self.telemetry = telemetry
        self.engine = engine
        self.settings = settings
        self.session = secrets.token_hex(6)
        self.connected_at = time.time()
        self.messages_sent = 0
        self.tokens_sent = 0
        self._send_lock = asyncio.Lock()
        self._generations: dict[str, asyncio.Task[None]] = {}
        self._engine_ids: dict[str, str] = {}
        self._auto_ids = itertools.count(1)
        self._closing = False

    @property
    def running_generations(self) -> int:
        return len(self._generations)

    async def run(self, subprotocol: str | None = None) -> None:
        await self.ws.accept(subprotocol=subprotocol)
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self.send(
                messages.hello(
                    self.session,
                    self.engine.model_name,
                    {**self.settings.limits.as_dict(), "context_tokens": self.engine.max_context},
                    self.settings.heartbeat_interval,
                )
            )
            if self.settings.heartbeat_interval > 0:
                heartbeat = asyncio.create_task(self._heartbeat())
            await self._read_loop()
        except (WebSocketDisconnect, _SlowConsumer):
            pass
        finally:
            self._closing = True
            if heartbeat is not None:
                heartbeat.cancel()
            await self._cancel_generations()
            await self._close(1000)

    async def shutdown(self) -> None:
        """The server stops: end each running generation with ``shutting_down``, then close with 1001."""
        for gen_id in await self._cancel_generations():
            self.telemetry.error(ErrorCode.SHUTTING_DOWN.value)
            await self._send_quietly(
                messages.error(ErrorCode.SHUTTING_DOWN, "the server is shutting down; try again later", gen_id)
            )
        self._closing = True
        await self._close(1001)

    async def _cancel_generations(self) -> list[str]:
        """Cancel every running generation (closing its engine stream aborts the request); returns their ids."""
        gen_ids = list(self._generations)
        tasks = [self._generations[g] for g in gen_ids]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return gen_ids

    async def _close(self, code: int) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)

    # -- reading
    async def _read_loop(self) -> None:
        while True:
            frame = await self.ws.receive()
            if frame["type"] == "websocket.disconnect":
                return
            data = frame.get("text")
            if data is None:
                data = frame.get("bytes") or b""
            try:
                msg = parse_message(data, self.settings.limits)
            except ProtocolError as err:
                await self.send_error(err.code, err.message, err.id, err.param)
                continue
            await self._dispatch(msg)

    async def _dispatch(self, msg: Generate | Cancel | Ping | Pong | Resume) -> None:
        if isinstance(msg, Generate):
            await self._start_generation(msg)
        elif isinstance(msg, Cancel):
            engine_id = self._engine_ids.get(msg.id)
            if engine_id is None:
                await self.send_error(ErrorCode.NOT_FOUND, f"no running generation with id {msg.id!r}", msg.id, "id")
            else:
                self.engine.abort(engine_id)
        elif isinstance(msg, Ping):
            await self.send(messages.pong(msg.ts))
        elif isinstance(msg, Resume):
            await self.send_error(
                ErrorCode.NOT_FOUND,
                f"no generation with id {msg.id!r} can be resumed (this server keeps no finished streams)",
                msg.id,
                "id",
            )

    async def _start_generation(self, msg: Generate) -> None:
        gen_id = msg.id if msg.id is not None else f"gen-{next(self._auto_ids)}"
        if gen_id in self._generations:
            await self.send_error(
                ErrorCode.DUPLICATE_ID, f"a generation with id {gen_id!r} is already running", gen_id, "id"
            )
            return
        cap = self.settings.limits.max_generations_per_connection
        if len(self._generations) >= cap:
            await self.send_error(
                ErrorCode.RATE_LIMITED, f"this connection already runs {cap} generations; wait for one to end", gen_id
            )
            return
        engine_id = f"{self.session}:{gen_id}"
        request = GenerationRequest(
            request_id=engine_id,
            params=msg.params,
            prompt=msg.prompt,
            messages=msg.messages,
            raw=msg.raw,
            truncate=msg.truncate,
        )
        self._engine_ids[gen_id] = engine_id
        task = asyncio.create_task(self._run_generation(gen_id, request, msg))
        self._generations[gen_id] = task

    # -- one generation
    async def _run_generation(self, gen_id: str, request: GenerationRequest, msg: Generate) -> None:
        seq = 0
        coalescer = Coalescer(msg.batch) if msg.batch else None
        trace = self.telemetry.trace(request.request_id, self.session, "websocket")
        try:
            stream = self.engine.generate(request)
            async with contextlib.aclosing(stream):
                async for out in with_deadlines(stream, coalescer.deadline if coalescer and coalescer.timed else None):
                    if out is None:  # a batch deadline passed with no new output
                        seq = await self._flush(gen_id, seq, coalescer)
                        continue
                    if out.kind is OutputKind.STARTED:
                        await self.send(messages.started(gen_id, self.engine.model_name, out.prompt_tokens))
                    elif out.kind is OutputKind.DELTA:
                        trace.delta(out.text, out.num_tokens)
                        seq = await self._deliver(gen_id, seq, coalescer, out)
                    else:
                        if out.text:
                            trace.delta(out.text, out.num_tokens)
                        trace.finished(out)
                        seq = await self._deliver(gen_id, seq, coalescer, out)
                        seq = await self._flush(gen_id, seq, coalescer)
                        assert out.finish_reason is not None
                        self._release(gen_id)  # the client may reuse the id as soon as it sees complete
                        await self.send(
                            messages.complete(
                                gen_id,
                                seq + 1,
                                out.finish_reason,
                                out.prompt_tokens,
                                out.completion_tokens,
                                out.timings,
                            )
                        )
        except EngineError as err:
            self._release(gen_id)
            trace.failed(err.code.value)
            await self._send_quietly(messages.error(err.code, err.message, gen_id, err.param))
        except (asyncio.CancelledError, WebSocketDisconnect, _SlowConsumer):
            pass  # the connection is going away; aclosing() aborted the request in the engine
        except Exception as exc:  # a bug: report it on this generation, keep the connection
            log.exception("generation %s failed", gen_id)
            trace.failed(ErrorCode.GENERATION_FAILED.value)
            await self._send_quietly(messages.error(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}", gen_id))
        finally:
            trace.abandoned()
            if self._generations.get(gen_id) is asyncio.current_task():
                self._release(gen_id)

    def _release(self, gen_id: str) -> None:
        self._generations.pop(gen_id, None)
        self._engine_ids.pop(gen_id, None)

    async def _deliver(self, gen_id: str, seq: int, coalescer: Coalescer | None, out: RequestOutput) -> int:
        if not out.text and out.kind is OutputKind.FINISHED:
            self.tokens_sent += out.num_tokens  # generated, but their bytes never made a character
            return seq
        if coalescer is None:
            if out.text:
                seq += 1
                self.tokens_sent += out.num_tokens
                await self.send(messages.token(gen_id, seq, out.text, out.num_tokens, batched=False))
            return seq
        if coalescer.would_overflow(out.num_tokens):
            seq = await self._flush(gen_id, seq, coalescer)
        coalescer.add(out.text, out.num_tokens, time.monotonic())
        if coalescer.due(time.monotonic()):
            seq = await self._flush(gen_id, seq, coalescer)
        return seq

    async def _flush(self, gen_id: str, seq: int, coalescer: Coalescer | None) -> int:
        if coalescer is None or coalescer.empty:
            return seq
        text, tokens = coalescer.take()
        if not text:
            return seq
        seq += 1
        self.tokens_sent += tokens
        await self.send(messages.token(gen_id, seq, text, tokens, batched=True))
        return seq

    # -- writing
    async def send_error(self, code: ErrorCode, content: str, gen_id: str | None, param: str | None = None) -> None:
        self.telemetry.error(code.value)
        await self.send(messages.error(code, content, gen_id, param))

    async def send(self, message: dict[str, Any]) -> None:
        data = messages.encode(message)
        async with self._send_lock:
            try:
                await asyncio.wait_for(self.ws.send_text(data), self.settings.slow_consumer_timeout)
            except TimeoutError:
                log.warning("closing connection %s: the client does not read", self.session)
                raise _SlowConsumer() from None
            except RuntimeError as exc:  # sending after close
                raise WebSocketDisconnect(1006) from exc
        self.messages_sent += 1
        self.telemetry.websocket_sent(data)

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        if self._closing:
            return
        with contextlib.suppress(WebSocketDisconnect, _SlowConsumer, OSError):
            await self.send(message)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.send(messages.ping(time.time()))
            except (WebSocketDisconnect, _SlowConsumer, OSError):
                return
