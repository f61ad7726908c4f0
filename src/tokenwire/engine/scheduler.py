"""Continuous batching: who runs this step, and in which KV-cache row.

Running sequences occupy rows ``0..n-1`` of the KV cache, decoding ones first (rows ``0..num_decode-1``) so
that a decode step reads one contiguous slice of the cache. Every change of rows is returned as a list of
swaps for the model runner to apply to the cache before the next forward pass. Plain Python: tested
without torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenwire.engine.sequence import SeqState, Sequence


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64  # sequences running at once (KV-cache rows)
    max_waiting: int = 1024  # queued sequences beyond that; more is "overloaded"
    kv_cache_tokens: int = 1 << 17  # rows x longest reserved length may not exceed this
    max_prefill_tokens: int = 512  # prompt tokens computed per step: long prompts are chunked

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "kv_cache_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(slots=True, frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


@dataclass(slots=True)
class SchedulerOutput:
    prefill: list[PrefillChunk] = field(default_factory=list)
    num_decode: int = 0  # rows 0..num_decode-1 decode one token each
    admitted: list[Sequence] = field(default_factory=list)  # given a row at this step


Swap = tuple[int, int]


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV row
        self.num_decode = 0
        self._by_id: dict[str, Sequence] = {}

    # -- queries
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def can_accept(self) -> bool:
        return len(self.waiting) < self.config.max_waiting

    def reserved_tokens(self) -> int:
        """KV positions the running rows may grow to: rows x longest reservation."""
        if not self.running:
            return 0
        return len(self.running) * max(s.reserved_length for s in self.running)

    # -- changes
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        seq.state = SeqState.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def remove(self, seq: Sequence) -> list[Swap]:
        """Take a waiting or running sequence out; returns the row swaps this caused."""
        self._by_id.pop(seq.request_id, None)
        swaps: list[Swap] = []
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        elif seq.state in (SeqState.PREFILL, SeqState.DECODE):
            if seq.state is SeqState.DECODE:
                self.num_decode -= 1
                self._swap(seq.row, self.num_decode, swaps)  # to the first prefill row
            self._swap(seq.row, len(self.running) - 1, swaps)  # to the last row
            self.running.pop()
        seq.state = SeqState.FINISHED
        seq.row = -1
        return swaps

    def promote(self, seq: Sequence) -> list[Swap]:
        """The prompt is fully cached: move the sequence into the decoding rows."""
        swaps: list[Swap] = []
        self._swap(seq.row, self.num_decode, swaps)
        self.num_decode += 1
        seq.state = SeqState.DECODE
        return swaps

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(admitted=self._admit())
        out.num_decode = self.num_decode
        budget = self.config.max_prefill_tokens
        for seq in self.running[self.num_decode :]:
            if budget <= 0:
                break
            end = min(len(seq.prompt_ids), seq.num_computed + budget)
            out.prefill.append(PrefillChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        return out

    def _admit(self) -> list[Sequence]:
        cfg = self.config
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < cfg.max_batch_size:
            seq = self.waiting[0]
            longest = max([seq.reserved_length] + [s.reserved_length for s in self.running])
            if self.running and (len(self.running) + 1) * longest > cfg.kv_cache_tokens:
                break  # would not fit; it waits for a running sequence to finish
            self.waiting.popleft()
            seq.state = SeqState.PREFILL
            seq.row = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _swap(self, i: int, j: int, swaps: list[Swap]) -> None:
        if i == j:
            return
        a, b = self.running[i], self.running[j]
        self.running[i], self.running[j] = b, a
        a.row, b.row = j, i
        swaps.append((i, j))
