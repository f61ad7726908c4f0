"""Continuous batching: who runs this step, in which order, and which KV-cache blocks hold each sequence.

Running sequences are kept in batch order, decoding ones first (``running[0..num_decode-1]``), so that the decode
step and the prefill chunks each take one contiguous range of them. A row is only a place in the batch: the KV
lives in fixed-size blocks (block_manager.py), one block table per sequence, grown as its prefill chunks and decode
steps need them (this step's are in place when :meth:`Scheduler.schedule` returns) and freed when it leaves.

Admission counts blocks: a waiting sequence is admitted while its reservation (prompt + max_new_tokens, in blocks)
plus what the running sequences may still claim fits in the blocks available (free ones, and cached ones that can be
evicted). So a running sequence never runs out of blocks, and no preemption is needed; memory is still taken only
as tokens arrive, and a reserved block not claimed yet keeps holding cached prefixes meanwhile.

The prefix cache is matched when a sequence's *first chunk* is scheduled, not when it is admitted: sequences that
arrive together are admitted together, and matched one after the other, so each one scheduled after the first has
computed (and committed) a shared system prompt reuses its blocks. Plain Python: tested without torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwire.engine.block_manager import BlockManager
from tokenwire.engine.sequence import SeqState, Sequence


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64  # sequences running at once
    max_waiting: int = 1024  # queued sequences beyond that; more is "overloaded"
    kv_cache_tokens: int = 1 << 17  # the KV-cache pool, in tokens (rounded up to whole blocks)
    max_prefill_tokens: int = 512  # prompt tokens computed per step: long prompts are chunked
    block_tokens: int = 32  # positions per KV-cache block (OpenVINO's block size: cached_tokens compare)
    prefix_caching: bool = True  # reuse the cached full blocks of a prompt's prefix
    max_context: int = 0  # the longest sequence (the context window): the pool holds at least one; 0: unknown

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "kv_cache_tokens", "max_prefill_tokens", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_context < 0:
            raise ValueError("max_context must be >= 0")

    @property
    def num_blocks(self) -> int:
        """The pool: the budget in blocks, or one whole context if that is more (a request always fits alone)."""
        b = self.block_tokens
        return max(-(-self.kv_cache_tokens // b), -(-self.max_context // b))


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
    num_decode: int = 0  # running[0..num_decode-1] decode one token each
    admitted: list[Sequence] = field(default_factory=list)  # out of the waiting queue at this step
    matched: list[Sequence] = field(default_factory=list)  # got their block table (and cached_tokens) at this step


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        make_room: Callable[[int], None] | None = None,
        reuse: Callable[[Sequence], int] | None = None,
    ) -> None:
        """``make_room(n)`` is called when admission needs ``n`` blocks available and fewer are: the owner of
        blocks held outside the batch (a paused request's kept KV) frees what it can. ``reuse(seq)``: a backend
        that keeps prefixes itself (llama.cpp's sequences) says, at a sequence's first chunk, how many of its
        prompt's leading tokens it already holds for it; the block pool then only counts them (its own prefix
        matching is the backend's, so ``prefix_caching`` is off in the pool)."""
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_tokens, config.prefix_caching and reuse is None)
        self.make_room = make_room
        self.reuse = reuse
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == row (the place in the batch)
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

    def outstanding_blocks(self) -> int:
        """Blocks the running sequences may still claim: each one's reservation less the blocks it holds."""
        return sum(self._outstanding(s) for s in self.running)

    def blocks_in_batch(self) -> int:
        """Blocks the running sequences hold (a shared one once). Safe to call from another thread (stats)."""
        ids: set[int] = set()
        for seq in list(self.running):
            try:
                ids.update(self.blocks.table(seq.request_id).block_ids)
            except ValueError:  # not matched yet, or it just left
                continue
        return len(ids)

    # -- changes
    def add(self, seq: Sequence) -> None:
        """Queue a sequence. It may already hold a block table (a paused request's kept KV): its prefill then
        starts at ``seq.num_computed``."""
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already scheduled")
        seq.state = SeqState.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def remove(self, seq: Sequence, keep_blocks: bool = False) -> None:
        """Take a waiting or running sequence out and free its blocks (full ones stay in the prefix cache), or,
        with ``keep_blocks``, leave its block table to the caller (who frees it with ``blocks.free`` later)."""
        self._by_id.pop(seq.request_id, None)
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        elif seq.state in (SeqState.PREFILL, SeqState.DECODE):
            if seq.state is SeqState.DECODE:
                self.num_decode -= 1
                self._swap(seq.row, self.num_decode)  # to the first prefill row
            self._swap(seq.row, len(self.running) - 1)  # to the last row
            self.running.pop()
        if not keep_blocks and seq.request_id in self.blocks:
            self.blocks.free(seq.request_id)
        seq.state = SeqState.FINISHED
        seq.row = -1

    def promote(self, seq: Sequence) -> None:
        """The prompt is fully cached: move the sequence into the decoding rows."""
        self._swap(seq.row, self.num_decode)
        self.num_decode += 1
        seq.state = SeqState.DECODE

    def schedule(self) -> SchedulerOutput:
        """This step's work: every decoding sequence one token, then prompt chunks up to ``max_prefill_tokens``.
        Every position the step computes has a block when this returns."""
        out = SchedulerOutput(admitted=self._admit())
        out.num_decode = self.num_decode
        for seq in self.running[: self.num_decode]:
            self.blocks.ensure(seq.request_id, seq.length)  # the last sampled token's position
        budget = self.config.max_prefill_tokens
        for seq in self.running[self.num_decode :]:
            if budget <= 0:
                break
            rid = seq.request_id
            if rid not in self.blocks:  # its first chunk: what the prefix cache holds is not computed again
                seq.cached_tokens = self.blocks.allocate(rid, seq.prompt_ids, num_tokens=0)
                if self.reuse is not None:
                    seq.cached_tokens = self.reuse(seq)
                seq.num_computed = seq.cached_tokens
                out.matched.append(seq)
            end = min(len(seq.prompt_ids), seq.num_computed + budget)
            self.blocks.ensure(rid, end)
            out.prefill.append(PrefillChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        return out

    def _outstanding(self, seq: Sequence) -> int:
        held = len(self.blocks.table(seq.request_id).block_ids) if seq.request_id in self.blocks else 0
        return max(0, self.blocks.blocks_for(seq.reserved_length) - held)

    def _admit(self) -> list[Sequence]:
        cfg = self.config
        admitted: list[Sequence] = []
        claimed = self.outstanding_blocks()
        while self.waiting and len(self.running) < cfg.max_batch_size:
            seq = self.waiting[0]
            need = claimed + self._outstanding(seq)
            if self.blocks.num_available_blocks < need <= self.blocks.num_available_blocks + self._held_outside():
                self._make_room(need)  # only when it is enough: kept KV is not dropped for nothing
            if need > self.blocks.num_available_blocks and self.running:
                break  # it waits for a running sequence to finish
            self.waiting.popleft()
            seq.state = SeqState.PREFILL
            seq.row = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
            claimed = need
        return admitted

    def _held_outside(self) -> int:
        """Blocks that only tables outside the batch hold (kept KV of paused or queued requests): freeing those
        tables would make them available."""
        return self.blocks.num_used_blocks - self.blocks_in_batch()

    def _make_room(self, need: int) -> None:
        """Blocks held outside the batch give way: paused requests' kept KV (the owner's ``make_room``), then the
        tables that queued sequences behind the head brought with them (they start from the prefix cache then)."""
        if self.make_room is not None:
            self.make_room(need)
        for seq in list(self.waiting)[1:]:
            if need <= self.blocks.num_available_blocks:
                break
            if seq.request_id in self.blocks:
                self.blocks.free(seq.request_id)
                seq.num_computed = 0

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self.running[i], self.running[j]
        self.running[i], self.running[j] = b, a
        a.row, b.row = j, i
