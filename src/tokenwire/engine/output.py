"""The output side of every backend: token ids in, :class:`RequestOutput` out.

A backend only says which token each running request got. Here each request's tokens are checked against its
end (the end-of-sequence token unless ``ignore_eos``, a stop string, ``max_tokens`` or the room left in the
context), detokenized incrementally (UTF-8 safe, stop strings never sent) and turned into ``DELTA`` and
``FINISHED`` outputs with usage and timings. Plain Python, no torch: tested with any tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenwire.engine.detokenizer import IncrementalDetokenizer
from tokenwire.engine.interface import FinishReason, OutputKind, RequestOutput, SamplingParams, Timings
from tokenwire.engine.stop import StopStringFilter


@dataclass(slots=True, eq=False)
class _Stream:
    """What the output side keeps of one request."""

    params: SamplingParams
    prompt_tokens: int
    max_new_tokens: int  # max_tokens clipped to the room left in the context window
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    submitted_at: float
    scheduled_at: float | None = None
    first_token_at: float | None = None
    generated: int = 0
    unreported: int = 0  # tokens whose text is still held back
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    token_ids: list[int] = field(default_factory=list)  # generated so far: a paused request continues from them
    continued: bool = False  # it was paused and re-admitted: the backend's cache reports are not about its prompt

    def timings(self, now: float) -> Timings:
        start = self.submitted_at
        total = now - start
        return Timings(
            queue_ms=round(((self.scheduled_at or now) - start) * 1000, 2),
            ttft_ms=round(((self.first_token_at or now) - start) * 1000, 2),
            total_ms=round(total * 1000, 2),
            tokens_per_second=round(self.generated / total, 2) if total > 0 else 0.0,
        )


class OutputProcessor:
    """Per-request output state for all running requests; used by one thread (the engine loop's)."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = frozenset(eos_ids)
        self._streams: dict[str, _Stream] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def add(
        self, request_id: str, params: SamplingParams, prompt_tokens: int, max_new_tokens: int, submitted_at: float
    ) -> None:
        self._streams[request_id] = _Stream(
            params=params,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_filter=StopStringFilter(params.stop),
            submitted_at=submitted_at,
        )

    def scheduled(self, request_id: str, now: float) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and stream.scheduled_at is None:
            stream.scheduled_at = now

    def cached(self, request_id: str, cached_tokens: int) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and not stream.continued:
            stream.cached_tokens = cached_tokens

    def prime(self, request_id: str, token_ids: Iterable[int]) -> None:
        """A generation that goes on from another process: run the tokens it had generated (and delivered) through
        this request's state, outputs discarded, so that what comes next continues its text exactly (the
        detokenizer's and the stop filter's held-back tail included) and counts towards its max_tokens."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        for token in token_ids:
            stream.token_ids.append(token)
            stream.generated += 1
            stream.stop_filter.push(stream.detokenizer.push(token))
        stream.unreported = 0
        stream.continued = True

    def generated_ids(self, request_id: str) -> list[int]:
        """The tokens a request generated so far (its prompt's continuation)."""
        stream = self._streams.get(request_id)
        return list(stream.token_ids) if stream is not None else []

    def continues(self, request_id: str) -> None:
        """A paused request goes on: what the backend reports of its new prompt is not news to the client."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.continued = True

    def tokens(self, request_id: str, token_ids: Iterable[int], now: float) -> tuple[list[RequestOutput], bool]:
        """The outputs that ``token_ids`` (the request's next tokens, in order) make, and whether the request has
        ended (the caller then frees its slot in the backend). Tokens after an end are ignored."""
        stream = self._streams.get(request_id)
        if stream is None:
            return [], True
        out: list[RequestOutput] = []
        if stream.first_token_at is None:
            stream.first_token_at = now
            if stream.scheduled_at is None:
                stream.scheduled_at = now
        for token in token_ids:
            stream.token_ids.append(token)
            stream.generated += 1
            stream.unreported += 1
            if token in self._eos and not stream.params.ignore_eos:
                out.append(self._finish(request_id, stream, FinishReason.STOP))
                return out, True
            piece = stream.stop_filter.push(stream.detokenizer.push(token))
            if piece.stopped:
                out.append(self._finish(request_id, stream, FinishReason.STOP, piece.text, flush=False))
                return out, True
            if stream.generated >= stream.max_new_tokens:
                out.append(self._finish(request_id, stream, FinishReason.LENGTH, piece.text))
                return out, True
            if piece.text:
                ids = tuple(stream.token_ids[-stream.unreported :])
                out.append(
                    RequestOutput(
                        request_id, OutputKind.DELTA, text=piece.text, num_tokens=stream.unreported, token_ids=ids
                    )
                )
                stream.unreported = 0
        return out, False

    def finish(self, request_id: str, reason: FinishReason) -> RequestOutput | None:
        """End a request for a reason of the backend's or the client's (``CANCELLED``); None if it already ended."""
        stream = self._streams.get(request_id)
        return None if stream is None else self._finish(request_id, stream, reason)

    def drop(self, request_id: str) -> None:
        """Forget a request that failed (its error goes out instead of a ``FINISHED``)."""
        self._streams.pop(request_id, None)

    def _finish(
        self, request_id: str, stream: _Stream, reason: FinishReason, text: str = "", flush: bool = True
    ) -> RequestOutput:
        """Unless a stop string cut it, the text still held back is final and goes out too."""
        del self._streams[request_id]
        if flush:
            tail = stream.stop_filter.push(stream.detokenizer.flush())
            text += tail.text
            if tail.stopped:
                reason = FinishReason.STOP
            else:
                text += stream.stop_filter.flush()
        return RequestOutput(
            request_id,
            OutputKind.FINISHED,
            text=text,
            num_tokens=stream.unreported,
            token_ids=tuple(stream.token_ids[-stream.unreported :]) if stream.unreported else (),
            finish_reason=reason,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.generated,
            cached_tokens=stream.cached_tokens,
            timings=stream.timings(time.monotonic()),
        )
