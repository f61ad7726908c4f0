"""The transformers backend: load a model, and step it (engine/loop.py runs the loop around it).

Each step asks the scheduler what to run (its KV-cache blocks are then in place), runs the prefill chunks and one
batched decode step over the block KV cache, registers the blocks those passes filled in the prefix cache, and
samples one token per row. End-of-sequence, stop strings, max_tokens and detokenizing are the engine core's
(engine/output.py); a request that ended is removed before the next step, its full blocks left in the prefix
cache. A paused request's KV blocks, random generator and penalty counts are kept (parked.py) while the pool
allows, and go on when it continues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tokenwire.engine import models
from tokenwire.engine.backend import LoadedModel, StepOutput
from tokenwire.engine.hf import loader
from tokenwire.engine.hf.grammar import Grammars
from tokenwire.engine.hf.parked import ParkedKV, ParkedStore
from tokenwire.engine.hf.quant import quantize_int8
from tokenwire.engine.hf.runner import ModelRunner
from tokenwire.engine.hf.sampler import RequestSampling
from tokenwire.engine.interface import EngineError, EngineErrorCode, EngineStats, SamplingParams
from tokenwire.engine.loop import LoopEngine
from tokenwire.engine.scheduler import Scheduler, SchedulerConfig
from tokenwire.engine.sequence import SeqState, Sequence

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True, frozen=True)
class HFEngineConfig:
    model: str | None = None  # None: the default model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantize: str = "none"  # none | int8 (CPU: int8 weights for small decode batches, quant.py)
    max_model_len: int = 8192  # context window cap (the model's own limit if smaller)
    threads: int = 0  # torch intra-op threads on CPU; 0 = all cores
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    queue_timeout: float = 60.0  # seconds a new request may wait for a row before it fails overloaded (0: no limit)
    hang_timeout: float = 120.0  # a step longer than this means the model loop hangs: the server stops (0: never)
    json_whitespace: str = "compact"  # structured output: compact JSON, or flexible (whitespace between tokens)


class HFEngine(LoopEngine):
    """Serves any transformers causal LM with continuous batching over a block KV cache with prefix reuse."""

    backend: HFBackend

    def __init__(self, config: HFEngineConfig) -> None:
        """Resolves the model reference and checks the settings at once (ValueError); loading is in start()."""
        backend = HFBackend(config)
        limits = config.scheduler
        super().__init__(
            backend, backend.name, limits.max_batch_size + limits.max_waiting, config.queue_timeout, config.hang_timeout
        )


class HFBackend:
    """A transformers model over a block KV cache, stepped by the engine loop's thread."""

    kind = "transformers"
    alive = True

    def __init__(self, config: HFEngineConfig) -> None:
        _pick_dtype(config.dtype, torch.device("cpu"))  # an unknown dtype fails here, not after a long load
        if config.quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantize {config.quantize!r}; choose none or int8")
        self.config = config
        self._resolved = models.resolve(config.model)
        self.name = self._resolved.name
        self.scheduler = Scheduler(config.scheduler, self._make_room)  # again in load(), with the context window
        self.runner: ModelRunner | None = None
        self.sampling = RequestSampling()  # generators and schema matchers (grammars once loaded)
        self.parked = ParkedStore(self._release)  # the KV blocks of paused requests

    def load(self) -> LoadedModel:
        cfg = self.config
        device = torch.device(_pick_device(cfg.device))
        dtype = _pick_dtype(cfg.dtype, device)
        if device.type == "cpu" and cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        log.info("loading %s on %s as %s", self.name, device, str(dtype).removeprefix("torch."))
        model, tok = loader.load(self._resolved, str(device), dtype)
        if cfg.quantize == "int8":
            if device.type == "cpu":
                log.info("int8 weights for small decode batches: %d layers", quantize_int8(model))
            else:
                log.warning("--quantize int8 is for CPU; %s uses the %s weights as they are", device, dtype)
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_len = getattr(text_cfg, "max_position_embeddings", None) or cfg.max_model_len
        max_context = min(cfg.max_model_len, int(model_len))
        # The pool holds at least one whole context: a request larger than --kv-cache-tokens still runs alone.
        self.scheduler = Scheduler(replace(cfg.scheduler, max_context=max_context), self._make_room)
        blocks = self.scheduler.blocks
        self.runner = ModelRunner(model, device, dtype, blocks.block_tokens, blocks.num_blocks, self._table_of)
        vocab = int(getattr(text_cfg, "vocab_size", 0) or len(tok))
        self.sampling.grammars = Grammars(tok, vocab, compact=cfg.json_whitespace == "compact")
        log.info("model ready: %s, context %d tokens", self.name, max_context)
        return LoadedModel(tok, frozenset(_eos_ids(model, tok)), max_context)

    # -- requests
    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        seq = Sequence(request_id, prompt_ids, max_new_tokens, params, generated_before=continued)
        kept = self.parked.take(request_id)
        if kept is not None and kept.fits(prompt_ids):
            seq.num_computed = kept.tokens  # its block table is adopted: its prefill starts after the kept positions
        else:
            self._release(request_id)  # a table it kept that does not fit: a fresh one, from the prefix cache
        self.scheduler.add(seq)
        self.sampling.add(request_id, params, prompt_ids[len(prompt_ids) - continued :])  # a paused one: its own

    def park(self, request_id: str) -> None:
        """Out of the batch; its block table is kept (nothing is copied) while the pool allows, and its generator
        and grammar state too."""
        sched = self.scheduler
        seq = sched.get(request_id)
        if seq is None:
            return
        # computed positions: the last sampled token is not fed yet; a queued one may hold a table it adopted
        computed = seq.length - 1 if seq.state is SeqState.DECODE else seq.num_computed
        if computed > 0 and request_id in sched.blocks:
            tokens = (seq.prompt_ids + seq.output_ids)[:computed]
            sched.blocks.commit(request_id, tokens, computed)  # its full blocks: found again even if it gives way
            sched.remove(seq, keep_blocks=True)
            self.parked.put(request_id, ParkedKV(tokens))
        else:
            sched.remove(seq)
        self.sampling.park(request_id)

    def forgive(self, request_id: str) -> None:
        pass  # the model runs in this process: no restarts to count

    def remove(self, request_id: str) -> None:
        seq = self.scheduler.get(request_id)
        if seq is not None:
            self._drop(seq)  # its place, blocks and generator
        self.sampling.remove(request_id)  # a parked one's kept generator and matcher
        self.parked.drop(request_id)  # and its kept blocks

    def _make_room(self, need: int) -> None:
        """Paused requests' kept KV gives way to sequences being admitted (the scheduler asks for ``need`` blocks
        available): the oldest goes first; its full blocks stay in the prefix cache."""
        blocks = self.scheduler.blocks
        dropped = 0
        while blocks.num_available_blocks < need and self.parked.drop_oldest() is not None:
            dropped += 1
        if dropped:
            log.debug("dropped the kept KV of %d paused requests for room", dropped)

    def _release(self, request_id: str) -> None:
        if request_id in self.scheduler.blocks:
            self.scheduler.blocks.free(request_id)

    def _table_of(self, row: int) -> list[int]:
        sched = self.scheduler
        return sched.blocks.table(sched.running[row].request_id).block_ids

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def close(self) -> None:
        pass  # the model goes with the process

    def idle(self) -> None:
        """Storage shrinks to the blocks still referenced or cached: the prefix cache is kept between a chat's
        turns (the loop calls this whenever it waits for work)."""
        if self.runner is not None and self.runner.cache.capacity_blocks:
            self.runner.cache.shrink(self.scheduler.blocks.high_water())

    def stats(self) -> EngineStats:
        s = self.scheduler
        cache = self.runner.cache if self.runner else None
        block = s.blocks.block_tokens
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            max_batch_size=self.config.scheduler.max_batch_size,
            kv_cache_tokens_used=s.blocks_in_batch() * block,
            kv_cache_tokens_capacity=cache.capacity_tokens if cache is not None else 0,
            kv_cache_tokens_paused=self.parked.tokens,
            kv_cache_tokens_budget=s.blocks.num_blocks * block,
        )

    # -- the step
    def step(self) -> StepOutput:
        assert self.runner is not None
        sched = self.scheduler
        out = StepOutput()
        self.sampling.fail_refused(sched.get, out, self._drop)
        plan = sched.schedule()  # every position this step computes has a block now
        out.scheduled = [s.request_id for s in plan.admitted]
        for seq in plan.matched:
            out.cached[seq.request_id] = seq.cached_tokens
        try:
            # Prefill first: its chunks sit in consecutive rows from num_decode, in order, exactly as scheduled.
            # Promotions and finishes that follow only move rows >= num_decode, so the decode rows below stay
            # put. (Decoding first would let a finishing sequence reorder the prefill rows under the chunks.)
            self._prefill([c for c in plan.prefill if c.seq.state is SeqState.PREFILL], out)
            if plan.num_decode:
                self._decode(sched.running[: plan.num_decode], out)
        except Exception as exc:  # outside the forward passes (the cache could not grow): the batch fails
            log.exception("model step failed")
            for seq in list(sched.running):
                out.failed[seq.request_id] = EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {exc}")
                out.tokens.pop(seq.request_id, None)
                self._drop(seq)
            # Blocks are written only past what is shared, and registered only after their pass ran, so kept and
            # cached KV stays valid; the cache is dropped all the same, to be safe, and the storage given back.
            sched.blocks.clear_cache()
            self.runner.cache.shrink(sched.blocks.high_water())
        return out

    def _prefill(self, chunks: list[Any], out: StepOutput) -> None:
        """One batched forward for every prompt chunk; a prompt whose last chunk ran samples its first token."""
        runner, sched = self.runner, self.scheduler
        assert runner is not None
        if not chunks:
            return
        ran, logits = self._forward_isolated(
            [c.seq for c in chunks],
            lambda: runner.prefill(
                chunks[0].seq.row, [c.seq.prompt_ids[c.start : c.end] for c in chunks], [c.start for c in chunks]
            ),
            lambda i: runner.prefill(
                chunks[i].seq.row, [chunks[i].seq.prompt_ids[chunks[i].start : chunks[i].end]], [chunks[i].start]
            ),
            out,
        )
        for i in ran:  # computed: their full blocks can be shared from now on
            c = chunks[i]
            c.seq.num_computed = c.end
            sched.blocks.commit(c.seq.request_id, c.seq.prompt_ids, c.end)
        done = [j for j, i in enumerate(ran) if chunks[i].is_last]
        for j in done:
            sched.promote(chunks[ran[j]].seq)
        if done:
            self._sample([chunks[ran[j]].seq for j in done], logits[done], out)

    def _decode(self, decoding: list[Any], out: StepOutput) -> None:
        """One batched forward for every decoding sequence's last token, then its next token sampled."""
        runner, sched = self.runner, self.scheduler
        assert runner is not None
        ran, logits = self._forward_isolated(
            decoding,
            lambda: runner.decode([s.output_ids[-1] for s in decoding], [s.length - 1 for s in decoding]),
            lambda i: runner.decode([decoding[i].output_ids[-1]], [decoding[i].length - 1], decoding[i].row),
            out,
        )
        block = sched.blocks.block_tokens
        for i in ran:
            seq = decoding[i]
            if seq.length % block == 0:  # this step filled its last block
                sched.blocks.commit(seq.request_id, seq.prompt_ids + seq.output_ids, seq.length)
        if ran:
            self._sample([decoding[i] for i in ran], logits, out)

    def _forward_isolated(
        self,
        seqs: list[Sequence],
        batched: Callable[[], torch.Tensor],
        alone: Callable[[int], torch.Tensor],
        out: StepOutput,
    ) -> tuple[list[int], torch.Tensor]:
        """Run ``batched`` (one forward pass for ``seqs``); if it fails, run each sequence ``alone`` so that only the
        ones that fail by themselves fail. Returns the indexes into ``seqs`` that ran, and their logits [k, V].
        Rewriting a row's KV positions is idempotent (they lie in blocks it owns alone, registered in the prefix
        cache only after a pass succeeded), so running a row again after a failed batch is safe."""
        try:
            return list(range(len(seqs))), batched()
        except Exception as exc:
            log.warning("a batched forward pass of %d requests failed (%s); running each alone", len(seqs), exc)
        ran: list[int] = []
        rows: list[torch.Tensor] = []
        failed: list[tuple[Sequence, Exception]] = []
        for i, seq in enumerate(seqs):
            try:
                rows.append(alone(i))
                ran.append(i)
            except Exception as exc:
                log.exception("request %s failed in a forward pass of its own", seq.request_id)
                failed.append((seq, exc))
        for seq, error in failed:  # after every row ran: dropping moves rows
            out.failed[seq.request_id] = EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {error}")
            self._drop(seq)
        return ran, torch.cat(rows) if rows else torch.empty(0)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, out: StepOutput) -> None:
        self.sampling.sample(seqs, logits, out, self._drop)

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)  # its blocks: full ones stay in the prefix cache
        self.sampling.remove(seq.request_id)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for but torch sees no CUDA device")
    return device


def _cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bfloat16 matmuls then run ~3x faster than float32 (measured, docs/benchmarks.md)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}") from None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return ids
