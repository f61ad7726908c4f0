"""The engine core every backend shares: the event-loop side and the model loop; a backend is load + step.

Event-loop side (:class:`LoopEngine`, the :class:`~tokenwire.engine.interface.Engine` the server sees): a request
is tokenized in a worker thread (never the model thread: a long prompt costs its sender the time, not the running
streams), answered with ``STARTED``, and put in the model thread's inbox; its outputs come back through one queue
per request; closing the iterator aborts it.

Model loop (one thread owns the model): drain the inbox (adds, aborts, pauses), admit waiting requests into free
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
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenwire.engine.admission import AdmissionQueue
from tokenwire.engine.interface import (
    EngineError,
    EngineErrorCode,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationStart,
    OutputKind,
    RequestOutput,
    SamplingParams,
)
from tokenwire.engine.output import OutputProcessor
from tokenwire.engine.prompt import Prompt, PromptBuilder
from tokenwire.engine.recovery import CULPRIT_MESSAGE, Triage

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class LoadedModel:
    """What a backend's load gives the engine core."""

    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int


@dataclass(slots=True)
class StepOutput:
    """One step of a backend: the new token ids of each request that got some (in order), the requests scheduled
    for the first time, the requests that failed and those the backend ended by itself (both already removed
    from the backend), and how many model steps this was (a backend in another process may report several)."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    scheduled: list[str] = field(default_factory=list)
    failed: dict[str, EngineError] = field(default_factory=dict)
    finished: dict[str, FinishReason] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)  # prompt tokens a request found in the prefix cache
    lost: list[str] = field(default_factory=list)  # its process died and was restarted: these go on (recovery.py)
    steps: int = 1


class Backend(Protocol):
    """A model and how to step it. Every method runs in the model thread, except :meth:`stats`."""

    name: str  # the model's
    kind: str  # the engine's: transformers, openvino

    def load(self) -> LoadedModel: ...

    @property
    def alive(self) -> bool:
        """False once the backend cannot run anything any more (its process died)."""
        ...

    def close(self) -> None:
        """Stop for good (the model thread ends)."""

    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        """Queue a request; it joins the running batch at a coming step. ``continued`` > 0: a paused request goes
        on, and the last ``continued`` of ``prompt_ids`` are tokens it generated itself (output, for penalties)."""

    def park(self, request_id: str) -> None:
        """Take a paused request out of the batch (no compute, its row freed), keeping what the backend can to
        continue it cheaply when it comes back through :meth:`add`; :meth:`remove` forgets it for good."""

    def remove(self, request_id: str) -> None:
        """Free a request's slot and anything kept for it (it ended or was aborted); unknown ids are ignored."""

    def forgive(self, request_id: str) -> None:
        """``request_id`` was found to kill the backend's process (recovery.py): the deaths it was in do not count
        toward the backend's restart limit. A backend without a process of its own does nothing."""

    @property
    def has_work(self) -> bool: ...

    def step(self) -> StepOutput: ...

    def idle(self) -> None:
        """Nothing runs: give memory back."""

    def stats(self) -> EngineStats: ...


@dataclass(slots=True, frozen=True)
class _Add:
    request: GenerationRequest
    prompt: Prompt
    max_new_tokens: int
    submitted_at: float


@dataclass(slots=True, frozen=True)
class _Abort:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Pause:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Unpause:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Waiting:
    """A request in the admission queue: what the backend gets when a row is free."""

    request_id: str
    tenant: str
    connection: str
    queued_at: float
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    continued: int = 0  # the last `continued` prompt ids are its own output from before a pause


@dataclass(slots=True, frozen=True)
class _Failure:
    request_id: str
    error: EngineError


_Item = RequestOutput | _Failure


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
        # model thread only: who waits for a row, who has one, who is paused, and what each asked for
        self._waiting: AdmissionQueue[_Waiting] = AdmissionQueue()
        self._in_backend: set[str] = set()
        self._paused: set[str] = set()
        self._parked: set[str] = set()  # parked in the backend and not added again since: it may keep state
        self._requests: dict[str, _Waiting] = {}
        self._rows = 0
        self._next_expiry = 0.0
        self._triage = Triage()  # requests lost with a backend process: who goes on, who is to blame
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        # event loop only: requests whose _Add is not in the inbox yet (their prompt is being tokenized), with the
        # aborts, pauses and unpauses asked for them meanwhile, sent after the _Add (else an abort would reach the
        # model thread first, find nothing, and the request would run to its end)
        self._deferred: dict[str, list[_Abort | _Pause | _Unpause]] = {}
        self._thread: threading.Thread | None = None
        self._steps = 0
        self.prompts: PromptBuilder | None = None
        self.tokenizer: Any = None
        self._outputs: OutputProcessor | None = None
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
        self._outputs = OutputProcessor(model.tokenizer, model.eos_ids)
        self._rows = max(1, self.backend.stats().max_batch_size)

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
            waiting=s.waiting + len(self._waiting),
            paused=len(self._paused),
            steps=self._steps,
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
                if not self._drain_inbox(block=not self.backend.has_work and not self._waiting):
                    break
                self.admit_waiting()
                if self.backend.has_work:
                    self.step()
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
            self._fail_all(code, why)
            self.backend.close()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts. Returns False when asked to stop."""
        out: list[_Item] = []
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if msg is None:
                    return False
                if isinstance(msg, _Add):
                    self.admit(msg)
                elif isinstance(msg, _Abort):
                    self._abort(msg.request_id, out)
                elif isinstance(msg, _Pause):
                    self._pause(msg.request_id)
                else:
                    self._unpause(msg.request_id, out)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass
        finally:
            self.emit(out)
        if block and not self.backend.has_work:
            self.backend.idle()
        return True

    def admit(self, msg: _Add) -> None:
        """Take a new request: its output state now, a row when one is free (fairly: admission.py)."""
        assert self._outputs is not None
        request = msg.request
        rid = request.request_id
        self._outputs.add(rid, request.params, len(msg.prompt.token_ids), msg.max_new_tokens, msg.submitted_at)
        waiting = _Waiting(
            rid,
            request.tenant,
            request.connection,
            msg.submitted_at,
            msg.prompt.token_ids,
            request.params,
            msg.max_new_tokens,
        )
        self._requests[rid] = waiting
        generated = list(request.continuation.generated_ids) if request.continuation else []
        if not generated:
            self._waiting.push(waiting)
            return
        # It goes on from tokens made elsewhere: they are its output so far, and part of its prompt here.
        self._outputs.prime(rid, generated)
        left = msg.max_new_tokens - len(generated)
        if left <= 0:
            end = self._outputs.finish(rid, FinishReason.LENGTH)
            self._forget(rid)
            if end is not None:
                self.emit([end])
            return
        prompt_ids = msg.prompt.token_ids + generated
        self._waiting.push(
            dataclasses.replace(waiting, prompt_ids=prompt_ids, max_new_tokens=left, continued=len(generated))
        )

    def admit_waiting(self) -> None:
        """Give free rows to waiting requests; fail those that waited past the queue timeout."""
        while len(self._in_backend) < self._rows:
            waiting = self._waiting.peek()
            if waiting is None or not self._triage.may_admit(waiting.request_id, len(self._in_backend)):
                break  # a suspect runs alone after a crash (recovery.py)
            self._waiting.pop()
            self._in_backend.add(waiting.request_id)
            self._parked.discard(waiting.request_id)
            self._triage.admitted(waiting.request_id)
            self.backend.add(
                waiting.request_id, waiting.prompt_ids, waiting.params, waiting.max_new_tokens, waiting.continued
            )
        if self._queue_timeout > 0 and self._waiting:
            now = time.monotonic()
            if now >= self._next_expiry:
                self._next_expiry = now + min(0.25, self._queue_timeout / 4)
                self._expire(now - self._queue_timeout)

    def _expire(self, before: float) -> None:
        out: list[_Item] = []
        for waiting in self._waiting.expired(before):
            rid = waiting.request_id
            self._forget(rid)
            error = EngineError(
                EngineErrorCode.OVERLOADED,
                f"no slot became free within the queue timeout ({self._queue_timeout:g} s); try again later",
                retry_after=max(1.0, round(self._queue_timeout / 4)),
            )
            out.append(_Failure(rid, error))
        self.emit(out)

    def _forget(self, request_id: str) -> None:
        """The request ended or failed: drop every trace of it here (the backend's row included)."""
        assert self._outputs is not None
        if request_id in self._in_backend or request_id in self._parked:
            self._in_backend.discard(request_id)
            self._parked.discard(request_id)
            self.backend.remove(request_id)
        self._waiting.remove(request_id)
        self._paused.discard(request_id)
        self._requests.pop(request_id, None)
        self._outputs.drop(request_id)
        self._triage.forget(request_id)

    def _abort(self, request_id: str, out: list[_Item]) -> None:
        assert self._outputs is not None
        if request_id not in self._outputs:
            return
        end = self._outputs.finish(request_id, FinishReason.CANCELLED)
        self._forget(request_id)
        if end is not None:
            out.append(end)

    def _pause(self, request_id: str) -> None:
        if request_id not in self._requests or request_id in self._paused:
            return
        if request_id in self._in_backend:
            self._in_backend.discard(request_id)
            self._parked.add(request_id)
            self.backend.park(request_id)
        self._triage.left(request_id)
        self._waiting.remove(request_id)
        self._paused.add(request_id)  # last: stats never count it both running and paused

    def _unpause(self, request_id: str, out: list[_Item]) -> None:
        """Queue a paused request first in line, its generated tokens now part of its prompt."""
        outputs = self._outputs
        assert outputs is not None
        if request_id not in self._paused:
            return
        self._paused.discard(request_id)
        self._requeue(request_id, out)

    def _requeue(self, request_id: str, out: list[_Item], very_first: bool = False) -> None:
        """Queue a request that left the backend (paused, or lost with its process) first in line (``very_first``:
        ahead of the others first in line too), its generated tokens now part of its prompt."""
        outputs = self._outputs
        assert outputs is not None
        first = self._requests[request_id]
        generated = outputs.generated_ids(request_id)
        left = first.max_new_tokens - len(generated)
        if left <= 0:  # cannot happen: the output side ends a request at its last token
            end = outputs.finish(request_id, FinishReason.LENGTH)
            self._forget(request_id)
            if end is not None:
                out.append(end)
            return
        if not generated and not very_first:  # it never ran: it waits as it did, in its place
            self._waiting.push(first)
            return
        again = dataclasses.replace(
            first,
            prompt_ids=first.prompt_ids + generated,
            max_new_tokens=left,
            queued_at=time.monotonic(),
            continued=len(generated),
        )
        (self._waiting.push_first if very_first else self._waiting.push_front)(again)
        if generated:
            outputs.continues(request_id)

    def step(self) -> None:
        """One backend step, and its outputs: ``StepOutput --> RequestOutput``."""
        outputs = self._outputs
        assert outputs is not None
        result = self.backend.step()
        now = time.monotonic()
        out: list[_Item] = []
        for rid in result.scheduled:
            outputs.scheduled(rid, now)
        for rid, cached in result.cached.items():
            outputs.cached(rid, cached)
        for rid, error in result.failed.items():
            self._in_backend.discard(rid)  # the backend removed it already
            self._forget(rid)
            out.append(_Failure(rid, error))
        for rid, tokens in result.tokens.items():
            try:
                made, ended = outputs.tokens(rid, tokens, now)
            except Exception as exc:  # a bug for this request (its detokenizer, say): it fails, the others go on
                log.exception("request %s failed in the output side", rid)
                self._forget(rid)
                out.append(_Failure(rid, EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {exc}")))
                continue
            out.extend(made)
            if ended:
                self._forget(rid)
            elif self._triage.made(rid, len(tokens)) and rid in self._in_backend:  # cleared: the next suspect's turn
                self._in_backend.discard(rid)
                self._parked.add(rid)
                self.backend.park(rid)
                self._requeue(rid, out)
        if result.lost:
            self._recover(result.lost, out)
        for rid, reason in result.finished.items():
            self._in_backend.discard(rid)
            end = outputs.finish(rid, reason)  # None: the output side ended it already
            self._forget(rid)
            if end is not None:
                out.append(end)
        self._steps += result.steps
        self.emit(out)

    def _recover(self, lost: list[str], out: list[_Item]) -> None:
        """The backend's process died with ``lost`` in it and is back: they go on where they were, first in line,
        but the one found to kill it fails (recovery.py)."""
        lost = [rid for rid in lost if rid in self._requests]
        for rid in lost:
            self._in_backend.discard(rid)  # the backend holds nothing of them any more
            self._parked.discard(rid)
        culprit, go_on = self._triage.lost(lost)
        if culprit is not None:
            log.error("request %s was alone in the engine process when it died a second time: it fails", culprit)
            self.backend.forgive(culprit)
            self._forget(culprit)
            out.append(_Failure(culprit, EngineError(EngineErrorCode.GENERATION_FAILED, CULPRIT_MESSAGE)))
        log.warning("%d request(s) go on after the engine process died", len(go_on))
        for rid in reversed(go_on):  # each at the very front: in the end, in go_on's order (suspects first)
            self._requeue(rid, out, very_first=True)

    def _fail_all(self, code: EngineErrorCode, message: str) -> None:
        out: list[_Item] = []
        for rid in list(self._streams):
            if self._outputs is not None:
                self._forget(rid)
            out.append(_Failure(rid, EngineError(code, message)))
        self.emit(out)

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
