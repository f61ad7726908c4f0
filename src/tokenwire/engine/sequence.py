"""The engine's per-request state (plain Python, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenwire.engine.detokenizer import IncrementalDetokenizer
from tokenwire.engine.interface import FinishReason, GenerationRequest, Timings
from tokenwire.engine.stop import StopStringFilter


class SeqState(enum.Enum):
    WAITING = "waiting"  # tokenized, no slot yet
    PREFILL = "prefill"  # has a slot; prompt partly in the KV cache
    DECODE = "decode"  # producing one token per step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int  # max_tokens clipped to the room left in the context window
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    submitted_at: float = field(default_factory=time.monotonic)
    state: SeqState = SeqState.WAITING
    row: int = -1  # slot index in the KV cache while running
    num_computed: int = 0  # prompt tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    unreported_tokens: int = 0  # tokens whose text is still held back
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_length(self) -> int:
        """The most KV positions this sequence can ever need."""
        return len(self.prompt_ids) + self.max_new_tokens

    def timings(self, now: float) -> Timings:
        start = self.submitted_at
        queue = (self.scheduled_at or now) - start
        ttft = (self.first_token_at or now) - start
        total = now - start
        tps = len(self.output_ids) / total if total > 0 else 0.0
        return Timings(
            queue_ms=round(queue * 1000, 2),
            ttft_ms=round(ttft * 1000, 2),
            total_ms=round(total * 1000, 2),
            tokens_per_second=round(tps, 2),
        )
