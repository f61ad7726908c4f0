"""The model thread's side of the engine core (loop.py): who waits for a row, who has one, who is paused, and one
backend step turned into each request's outputs.

Messages from the event loop (:class:`_Add`, :class:`_Abort`, :class:`_Pause`, :class:`_Unpause`) are applied in
order (:meth:`ModelLoop.apply`); free rows go to waiting requests fairly (admission.py) and a request that waited
past the queue timeout fails ``overloaded``; a paused request leaves the backend's batch (``backend.park``) and,
when it goes on, is queued ahead of new requests with its generated tokens as part of its prompt; a backend
process that died takes its requests with it, and they go on first in line, but the one found to kill it fails
(recovery.py). Every method runs in the model thread; its outputs go to the event loop through ``emit``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.admission import AdmissionQueue
from tokenwire.engine.backend import Backend
from tokenwire.engine.interface import (
    EngineError,
    EngineErrorCode,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
)
from tokenwire.engine.output import OutputProcessor
from tokenwire.engine.prompt import Prompt
from tokenwire.engine.recovery import CULPRIT_MESSAGE, Triage

log = logging.getLogger(__name__)


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


class ModelLoop:
    """The model thread's state and steps (see the module docstring)."""

    def __init__(self, backend: Backend, queue_timeout: float, emit: Callable[[list[_Item]], None]) -> None:
        self.backend = backend
        self.queue_timeout = queue_timeout  # seconds a new request may wait for a row (0: no limit)
        self.emit = emit  # one step's outputs to the event loop
        self.waiting: AdmissionQueue[_Waiting] = AdmissionQueue()
        self.in_backend: set[str] = set()
        self.paused: set[str] = set()
        self.parked: set[str] = set()  # parked in the backend and not added again since: it may keep state
        self.requests: dict[str, _Waiting] = {}  # what each asked for
        self.rows = 0
        self.next_expiry = 0.0
        self.triage = Triage()  # requests lost with a backend process: who goes on, who is to blame
        self.steps = 0
        self.outputs: OutputProcessor | None = None

    def loaded(self, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        """The backend's model is loaded: the output side for its tokenizer, and its rows."""
        self.outputs = OutputProcessor(tokenizer, eos_ids)
        self.rows = max(1, self.backend.stats().max_batch_size)

    def apply(self, msg: _Add | _Abort | _Pause | _Unpause, out: list[_Item]) -> None:
        """One message from the event loop."""
        if isinstance(msg, _Add):
            self.admit(msg)
        elif isinstance(msg, _Abort):
            self._abort(msg.request_id, out)
        elif isinstance(msg, _Pause):
            self._pause(msg.request_id)
        else:
            self._unpause(msg.request_id, out)

    def admit(self, msg: _Add) -> None:
        """Take a new request: its output state now, a row when one is free (fairly: admission.py)."""
        assert self.outputs is not None
        request = msg.request
        rid = request.request_id
        self.outputs.add(rid, request.params, len(msg.prompt.token_ids), msg.max_new_tokens, msg.submitted_at)
        waiting = _Waiting(
            rid,
            request.tenant,
            request.connection,
            msg.submitted_at,
            msg.prompt.token_ids,
            request.params,
            msg.max_new_tokens,
        )
        self.requests[rid] = waiting
        generated = list(request.continuation.generated_ids) if request.continuation else []
        if not generated:
            self.waiting.push(waiting)
            return
        # It goes on from tokens made elsewhere: they are its output so far, and part of its prompt here.
        self.outputs.prime(rid, generated)
        left = msg.max_new_tokens - len(generated)
        if left <= 0:
            end = self.outputs.finish(rid, FinishReason.LENGTH)
            self.forget(rid)
            if end is not None:
                self.emit([end])
            return
        prompt_ids = msg.prompt.token_ids + generated
        self.waiting.push(
            dataclasses.replace(waiting, prompt_ids=prompt_ids, max_new_tokens=left, continued=len(generated))
        )

    def admit_waiting(self) -> None:
        """Give free rows to waiting requests; fail those that waited past the queue timeout."""
        while len(self.in_backend) < self.rows:
            waiting = self.waiting.peek()
            if waiting is None or not self.triage.may_admit(waiting.request_id, len(self.in_backend)):
                break  # a suspect runs alone after a crash (recovery.py)
            self.waiting.pop()
            self.in_backend.add(waiting.request_id)
            self.parked.discard(waiting.request_id)
            self.triage.admitted(waiting.request_id)
            self.backend.add(
                waiting.request_id, waiting.prompt_ids, waiting.params, waiting.max_new_tokens, waiting.continued
            )
        if self.queue_timeout > 0 and self.waiting:
            now = time.monotonic()
            if now >= self.next_expiry:
                self.next_expiry = now + min(0.25, self.queue_timeout / 4)
                self._expire(now - self.queue_timeout)

    def _expire(self, before: float) -> None:
        out: list[_Item] = []
        for waiting in self.waiting.expired(before):
            rid = waiting.request_id
            self.forget(rid)
            error = EngineError(
                EngineErrorCode.OVERLOADED,
                f"no slot became free within the queue timeout ({self.queue_timeout:g} s); try again later",
                retry_after=max(1.0, round(self.queue_timeout / 4)),
            )
            out.append(_Failure(rid, error))
        self.emit(out)

    def forget(self, request_id: str) -> None:
        """The request ended or failed: drop every trace of it here (the backend's row included)."""
        assert self.outputs is not None
        if request_id in self.in_backend or request_id in self.parked:
            self.in_backend.discard(request_id)
            self.parked.discard(request_id)
            self.backend.remove(request_id)
        self.waiting.remove(request_id)
        self.paused.discard(request_id)
        self.requests.pop(request_id, None)
        self.outputs.drop(request_id)
        self.triage.forget(request_id)

    def _abort(self, request_id: str, out: list[_Item]) -> None:
        assert self.outputs is not None
        if request_id not in self.outputs:
            return
        end = self.outputs.finish(request_id, FinishReason.CANCELLED)
        self.forget(request_id)
        if end is not None:
            out.append(end)

    def _pause(self, request_id: str) -> None:
        if request_id not in self.requests or request_id in self.paused:
            return
        if request_id in self.in_backend:
            self.in_backend.discard(request_id)
            self.parked.add(request_id)
            self.backend.park(request_id)
        self.triage.left(request_id)
        self.waiting.remove(request_id)
        self.paused.add(request_id)  # last: stats never count it both running and paused

    def _unpause(self, request_id: str, out: list[_Item]) -> None:
        """Queue a paused request first in line, its generated tokens now part of its prompt."""
        outputs = self.outputs
        assert outputs is not None
        if request_id not in self.paused:
            return
        self.paused.discard(request_id)
        self._requeue(request_id, out)

    def _requeue(self, request_id: str, out: list[_Item], very_first: bool = False) -> None:
        """Queue a request that left the backend (paused, or lost with its process) first in line (``very_first``:
        ahead of the others first in line too), its generated tokens now part of its prompt."""
        outputs = self.outputs
        assert outputs is not None
        first = self.requests[request_id]
        generated = outputs.generated_ids(request_id)
        left = first.max_new_tokens - len(generated)
        if left <= 0:  # cannot happen: the output side ends a request at its last token
            end = outputs.finish(request_id, FinishReason.LENGTH)
            self.forget(request_id)
            if end is not None:
                out.append(end)
            return
        if not generated and not very_first:  # it never ran: it waits as it did, in its place
            self.waiting.push(first)
            return
        again = dataclasses.replace(
            first,
            prompt_ids=first.prompt_ids + generated,
            max_new_tokens=left,
            queued_at=time.monotonic(),
            continued=len(generated),
        )
        (self.waiting.push_first if very_first else self.waiting.push_front)(again)
        if generated:
            outputs.continues(request_id)

    def step(self) -> None:
        """One backend step, and its outputs: ``StepOutput --> RequestOutput``."""
        outputs = self.outputs
        assert outputs is not None
        result = self.backend.step()
        now = time.monotonic()
        out: list[_Item] = []
        for rid in result.scheduled:
            outputs.scheduled(rid, now)
        for rid, cached in result.cached.items():
            outputs.cached(rid, cached)
        for rid, error in result.failed.items():
            self.in_backend.discard(rid)  # the backend removed it already
            self.forget(rid)
            out.append(_Failure(rid, error))
        for rid, tokens in result.tokens.items():
            try:
                made, ended = outputs.tokens(rid, tokens, now)
            except Exception as exc:  # a bug for this request (its detokenizer, say): it fails, the others go on
                log.exception("request %s failed in the output side", rid)
                self.forget(rid)
                out.append(_Failure(rid, EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {exc}")))
                continue
            out.extend(made)
            if ended:
                self.forget(rid)
            elif self.triage.made(rid, len(tokens)) and rid in self.in_backend:  # cleared: the next suspect's turn
                self.in_backend.discard(rid)
                self.parked.add(rid)
                self.backend.park(rid)
                self._requeue(rid, out)
        if result.lost:
            self._recover(result.lost, out)
        for rid, reason in result.finished.items():
            self.in_backend.discard(rid)
            end = outputs.finish(rid, reason)  # None: the output side ended it already
            self.forget(rid)
            if end is not None:
                out.append(end)
        self.steps += result.steps
        self.emit(out)

    def _recover(self, lost: list[str], out: list[_Item]) -> None:
        """The backend's process died with ``lost`` in it and is back: they go on where they were, first in line,
        but the one found to kill it fails (recovery.py)."""
        lost = [rid for rid in lost if rid in self.requests]
        for rid in lost:
            self.in_backend.discard(rid)  # the backend holds nothing of them any more
            self.parked.discard(rid)
        culprit, go_on = self.triage.lost(lost)
        if culprit is not None:
            log.error("request %s was alone in the engine process when it died a second time: it fails", culprit)
            self.backend.forgive(culprit)
            self.forget(culprit)
            out.append(_Failure(culprit, EngineError(EngineErrorCode.GENERATION_FAILED, CULPRIT_MESSAGE)))
        log.warning("%d request(s) go on after the engine process died", len(go_on))
        for rid in reversed(go_on):  # each at the very front: in the end, in go_on's order (suspects first)
            self._requeue(rid, out, very_first=True)

    def fail(self, request_ids: list[str], code: EngineErrorCode, message: str) -> None:
        """Fail every one of ``request_ids`` (the engine stops)."""
        out: list[_Item] = []
        for rid in request_ids:
            if self.outputs is not None:
                self.forget(rid)
            out.append(_Failure(rid, EngineError(code, message)))
        self.emit(out)
