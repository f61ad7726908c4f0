"""The engine core every backend shares: the event-loop side and the model loop; a backend is load + step.

Event-loop side (:class:`LoopEngine`, the :class:`~tokenwire.engine.interface.Engine` the server sees): a request
is tokenized in a worker thread (never the model thread: a long prompt costs its sender the time, not the running
streams), answered with ``STARTED``, and put in the model thread's inbox; its outputs come back through one queue
per request; closing the iterator aborts it.

Model loop (one thread owns the model; its state and steps are model_loop.py's ``ModelLoop``; a backend is the
``Backend`` of backend.py): drain the inbox (adds, aborts, pauses), admit waiting requests into free
rows (admission.py: fair across tenants and connections), ``backend.step()``, then the output side (output.py)
turns each request's new token ids into deltas and ends; a request that ended leaves the backend before the next
step. One step's outputs reach the event loop in one ``call_soon_threadsafe``::

    while running:
        inbox -> queue / abort / pause / unpause
        queue -> backend.add, while rows are free   # fair: round robin over tenants, then connections
        step = backend.step()                       # StepOutput: token ids per request
        outputs = output_processor(step)            # StepOutput --> RequestOutput
        ended -> backend.remove;  outputs -> event loop

A *paused* request (its reader is behind, or gone) leaves the backend's batch (``backend.park``): it costs no
compute and frees its row. It keeps its output state here; when it continues, it is queued ahead of new requests
with its prompt plus the tokens generated so far as the prompt (``continued`` says how many of them it made), so
the backend finds its KV where it kept it (the transformers engine keeps a paused row's KV while the KV budget
allows; OpenVINO's prefix cache holds its blocks) or rebuilds it, and the text goes on seamlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tokenwire.engine.backend import Backend
from tokenwire.engine.interface import (
    EngineError,
    EngineErrorCode,
    EngineStats,
    GenerationRequest,
    GenerationStart,
    OutputKind,
    RequestOutput,
)
from tokenwire.engine.model_loop import ModelLoop, _Abort, _Add, _Failure, _Item, _Pause, _Unpause
from tokenwire.engine.prompt import Prompt, PromptBuilder

log = logging.getLogger(__name__)


class LoopEngine:
    """The :class:`~tokenwire.engine.interface.Engine` for a backend run by a model thread in this process."""

    def __init__(
        self,
        backend: Backend,
        model_name: str,
        max_in_flight: int,
        queue_timeout: float = 0.0,
        hang_timeout: float = 120.0,
    ) -> None:
        self.backend = backend
        self._model_name = model_name
        self._aliases: tuple[str, ...] = ()
        self._max_in_flight = max_in_flight
        self._queue_timeout = queue_timeout  # seconds a new request may wait for a row (0: no limit)
        self._hang_timeout = hang_timeout  # a step running longer than this means the model loop hangs (0: never)
        self._beat = time.monotonic()  # the model loop's last sign of life
        self._failure: str | None = None  # why the engine stopped working, once it has
        self._max_context = 0
        self._ready = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Pause | _Unpause | None] = queue.SimpleQueue()
        self.model = ModelLoop(backend, queue_timeout, lambda items: self.emit(items))  # model thread only
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        # event loop only: requests whose _Add is not in the inbox yet (their prompt is being tokenized), with the
        # aborts, pauses and unpauses asked for them meanwhile, sent after the _Add (else an abort would reach the
        # model thread first, find nothing, and the request would run to its end)
        self._deferred: dict[str, list[_Abort | _Pause | _Unpause]] = {}
        self._thread: threading.Thread | None = None
        self.prompts: PromptBuilder | None = None
        self.tokenizer: Any = None
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-tokenize")

    # -- Engine properties
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def model_aliases(self) -> tuple[str, ...]:
        return self._aliases

    def serve_as(self, names: tuple[str, ...]) -> None:
        """Show the model to clients as ``names[0]`` and accept every one of ``names`` (``--served-model-name``)."""
        if names:
            self._model_name, self._aliases = names[0], names[1:]

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def ready(self) -> bool:
        return self._ready

    def health(self) -> str | None:
        """None while the engine works; else why it stopped: its loop crashed, its backend died, or a step has not
        ended for ``hang_timeout`` seconds. On a hang every running request fails at once with
        ``generation_failed`` (the model thread cannot be stopped; the process should be restarted)."""
        if self._failure is None and self._ready and self._hang_timeout > 0 and self._streams:
            stuck = time.monotonic() - self._beat
            if stuck > self._hang_timeout:
                self._failure = f"the model loop has not finished a step for {stuck:.0f} s: it hangs"
                log.error("%s; failing its %d requests", self._failure, len(self._streams))
                self._ready = False
                for rid, stream in list(self._streams.items()):
                    stream.put_nowait(_Failure(rid, EngineError(EngineErrorCode.GENERATION_FAILED, self._failure)))
        return self._failure

    # -- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._load_and_run, args=(loaded,), name="tokenwire-engine", daemon=True)
        self._thread.start()
        await loaded
        self._ready = True

    def _load_and_run(self, loaded: asyncio.Future[None]) -> None:
        """Load, then run the loop, in this one thread: the backend's libraries keep one thread team (an idle
        OpenMP team left by a separate loading thread doubled int8 decode steps, bench/results/ab-int8-cpu.md)."""
        loop = self._loop
        assert loop is not None
        try:
            self.load()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody waits
                loop.call_soon_threadsafe(_settle, loaded, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, loaded, None)
        self._run()

    def load(self) -> None:
        """Load the backend's model (in the calling thread) and set up the prompt and output sides."""
        model = self.backend.load()
        self._max_context = model.max_context
        self.tokenizer = model.tokenizer
        self.prompts = PromptBuilder(model.tokenizer, model.max_context)
        self.model.loaded(model.tokenizer, model.eos_ids)

    async def shutdown(self) -> None:
        self._ready = False
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        for rid, q in list(self._streams.items()):
            q.put_nowait(_Failure(rid, EngineError(EngineErrorCode.SHUTTING_DOWN, "the server is shutting down")))

    # -- requests (event loop side)
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        if not self._ready:
            if self._failure is not None:
                raise EngineError(
                    EngineErrorCode.GENERATION_FAILED, f"the engine failed ({self._failure}); try again later"
                )
            raise EngineError(
                EngineErrorCode.SHUTTING_DOWN if self._stopping else EngineErrorCode.OVERLOADED,
                "the engine is not ready",
            )
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(EngineErrorCode.DUPLICATE_ID, f"request id {rid!r} is already running", "id")
        if len(self._streams) >= self._max_in_flight:
            raise EngineError(EngineErrorCode.OVERLOADED, "too many requests are in flight; try again later")
        refuse = getattr(self.backend, "refuse", None)  # optional: what a backend cannot honour
        if refuse is not None and (reason := refuse(request.params)) is not None:
            raise reason
        # Unbounded in type, bounded in fact: the model thread puts at most one item per step per request,
        # and the stream ends after max_tokens steps.
        stream: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[rid] = stream
        self._deferred[rid] = []
        submitted_at = time.monotonic()
        finished = False
        try:
            if request.continuation is not None:  # its prompt was tokenized where it began
                prompt = Prompt(list(request.continuation.prompt_ids))
                if len(prompt.token_ids) >= self._max_context:
                    raise EngineError(EngineErrorCode.PROMPT_TOO_LONG, "the prompt does not fit this model's context")
            else:
                prompt = await self._tokenize(request)
            n = len(prompt.token_ids)
            self._inbox.put(_Add(request, prompt, min(request.params.max_tokens, self._max_context - n), submitted_at))
            for deferred in self._deferred.pop(rid, ()):
                self._inbox.put(deferred)
            start = GenerationStart(n, prompt.dropped_turns, tuple(prompt.token_ids))
            yield RequestOutput(rid, OutputKind.STARTED, start=start, prompt_tokens=n)
            while True:
                item = await stream.get()
                if isinstance(item, _Failure) or item.kind is OutputKind.FINISHED:
                    finished = True
                    self._streams.pop(rid, None)  # the id is free again before the consumer sees the end
                if isinstance(item, _Failure):
                    raise item.error
                yield item
                if finished:
                    return
        except EngineError:
            finished = True  # nothing to abort: it failed (or never reached the model thread)
            raise
        finally:
            self._streams.pop(rid, None)
            self._deferred.pop(rid, None)  # never added: what was asked for it is moot
            if not finished:  # the consumer went away: free the slot
                self._inbox.put(_Abort(rid))

    async def _tokenize(self, request: GenerationRequest) -> Prompt:
        prompts = self.prompts
        assert prompts is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenizing, prompts.build, request)
        except EngineError:
            raise
        except Exception as exc:  # the tokenizer refused the input: this request fails, nothing else
            log.warning("could not tokenize request %s: %s", request.request_id, exc)
            raise EngineError(
                EngineErrorCode.INVALID_REQUEST, f"the prompt could not be tokenized: {exc}", "prompt"
            ) from exc

    def abort(self, request_id: str) -> None:
        """End a request (finish reason ``cancelled``), also one whose prompt is still being tokenized."""
        self._tell(_Abort(request_id))

    def pause(self, request_id: str) -> None:
        """Take a request out of the running batch (no compute, its row and KV freed) until :meth:`unpause`."""
        self._tell(_Pause(request_id))

    def unpause(self, request_id: str) -> None:
        """Let a paused request continue: it is admitted ahead of new requests, its KV rebuilt."""
        self._tell(_Unpause(request_id))

    def _tell(self, msg: _Abort | _Pause | _Unpause) -> None:
        deferred = self._deferred.get(msg.request_id)
        if deferred is not None:  # its _Add is not in the inbox yet: this goes after it
            deferred.append(msg)
        else:
            self._inbox.put(msg)

    def stats(self) -> EngineStats:
        s = self.backend.stats()
        return dataclasses.replace(
            s,
            waiting=s.waiting + len(self.model.waiting),
            paused=len(self.model.paused),
            steps=self.model.steps,
            backend=self.backend.kind,
        )

    def _deliver(self, items: list[_Item]) -> None:
        """Event loop: route one step's outputs to their streams."""
        for item in items:
            stream = self._streams.get(item.request_id)
            if stream is not None:  # None: the consumer left; its abort is on the way
                stream.put_nowait(item)

    # -- the model thread
    def _run(self) -> None:
        code, why = EngineErrorCode.SHUTTING_DOWN, "the server is shutting down"
        try:
            while not self._stopping:
                self._beat = time.monotonic()
                if not self._drain_inbox(block=not self.backend.has_work and not self.model.waiting):
                    break
                self.model.admit_waiting()
                if self.backend.has_work:
                    self.model.step()
                if not self.backend.alive:
                    self._failure = f"the {self.backend.kind} engine stopped (its backend died)"
                    log.error("%s; the server is not ready any more", self._failure)
                    self._ready = False
                    code, why = EngineErrorCode.GENERATION_FAILED, self._failure
                    break
        except Exception as exc:  # a bug in the loop or the backend: the engine cannot go on
            log.exception("engine loop crashed")
            self._failure = f"the model loop crashed: {type(exc).__name__}: {exc}"
            self._ready = False
            code, why = EngineErrorCode.GENERATION_FAILED, self._failure
        finally:
            self.model.fail(list(self._streams), code, why)
            self.backend.close()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts. Returns False when asked to stop."""
        out: list[_Item] = []
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if msg is None:
                    return False
                self.model.apply(msg, out)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass
        finally:
            self.emit(out)
        if block and not self.backend.has_work:
            self.backend.idle()
        return True

    def emit(self, items: list[_Item]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled (a shutdown during the load)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
