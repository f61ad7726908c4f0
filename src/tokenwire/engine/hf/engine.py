"""The transformers backend: load a model, and step it (engine/loop.py runs the loop around it).

Each step asks the scheduler what to run, runs the prefill chunks and one batched decode step over the slot KV
cache, and samples one token per row. End-of-sequence, stop strings, max_tokens and detokenizing are the engine
core's (engine/output.py); a request that ended is removed before the next step. A paused request's KV, random
generator and penalty counts are kept (parked.py) while the KV budget allows, and go on when it continues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenwire.engine import models
from tokenwire.engine.hf import loader
from tokenwire.engine.hf.grammar import Grammars
from tokenwire.engine.hf.parked import ParkedKV, ParkedStore
from tokenwire.engine.hf.quant import quantize_int8
from tokenwire.engine.hf.runner import ModelRunner
from tokenwire.engine.hf.sampler import RowSampler, SamplingFailure
from tokenwire.engine.interface import EngineError, EngineErrorCode, EngineStats, SamplingParams
from tokenwire.engine.loop import LoadedModel, LoopEngine, StepOutput
from tokenwire.engine.scheduler import Scheduler, SchedulerConfig, Swap
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


class HFEngine(LoopEngine):
    """Serves any transformers causal LM with continuous batching over a slot KV cache."""

    backend: HFBackend

    def __init__(self, config: HFEngineConfig) -> None:
        """Resolves the model reference and checks the settings at once (ValueError); loading is in start()."""
        backend = HFBackend(config)
        limits = config.scheduler
        super().__init__(
            backend, backend.name, limits.max_batch_size + limits.max_waiting, config.queue_timeout, config.hang_timeout
        )


class HFBackend:
    """A transformers model over a slot KV cache, stepped by the engine loop's thread."""

    kind = "transformers"
    alive = True

    def __init__(self, config: HFEngineConfig) -> None:
        _pick_dtype(config.dtype, torch.device("cpu"))  # an unknown dtype fails here, not after a long load
        if config.quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantize {config.quantize!r}; choose none or int8")
        self.config = config
        self._resolved = models.resolve(config.model)
        self.name = self._resolved.name
        self.scheduler = Scheduler(config.scheduler)
        self.runner: ModelRunner | None = None
        self.sampler: RowSampler | None = None
        self.parked = ParkedStore()  # the KV of paused requests
        self._restore: dict[str, ParkedKV] = {}  # continued requests' kept KV, written to their row when admitted
        self.grammars: Grammars | None = None  # constrained decoding (json_schema)
        self._refused: dict[str, EngineError] = {}  # requests that failed on add: reported at the next step

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
        self.runner = ModelRunner(model, device, dtype)
        self.sampler = RowSampler(device)
        self.grammars = Grammars(tok, int(getattr(text_cfg, "vocab_size", 0) or len(tok)))
        log.info("model ready: %s, context %d tokens", self.name, max_context)
        return LoadedModel(tok, frozenset(_eos_ids(model, tok)), max_context)

    # -- requests
    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        assert self.sampler is not None
        seq = Sequence(request_id, prompt_ids, max_new_tokens, params, generated_before=continued)
        kept = self.parked.take(request_id)
        if kept is not None and kept.fits(prompt_ids):
            seq.num_computed = kept.tokens  # its prefill starts after the kept positions
            self._restore[request_id] = kept
        self.sampler.add(request_id, params.seed)  # a paused request gets its own generator back
        self.scheduler.add(seq)
        if params.json_schema is not None and self.grammars is not None:
            try:
                self.grammars.add(request_id, params.json_schema, prompt_ids[len(prompt_ids) - continued :])
            except Exception as exc:  # this request fails at the next step; the others go on
                log.warning("request %s: its schema could not be enforced: %s", request_id, exc)
                self._refused[request_id] = EngineError(
                    EngineErrorCode.INVALID_REQUEST, f"the schema could not be enforced: {exc}", "json_schema"
                )

    def park(self, request_id: str) -> None:
        """Out of the batch; its KV is copied out of its row (kept while the budget allows) and its generator kept."""
        assert self.runner is not None and self.sampler is not None
        seq = self.scheduler.get(request_id)
        if seq is None:
            return
        kept = self._restore.pop(request_id, None)  # continued, then paused again before it was admitted
        if seq.state is SeqState.DECODE:
            computed = seq.length - 1  # the last sampled token is not fed yet
        elif seq.state is SeqState.PREFILL:
            computed = seq.num_computed
        else:
            computed = 0
        if computed > 0:
            keys, values = self.runner.cache.read_row(seq.row, computed)
            kept = ParkedKV((seq.prompt_ids + seq.output_ids)[:computed], keys, values)
        self._apply(self.scheduler.remove(seq))
        self.sampler.park(request_id)
        if self.grammars is not None:
            self.grammars.park(request_id)
        if kept is not None:
            self.parked.put(request_id, kept)
            self._make_room()

    def remove(self, request_id: str) -> None:
        seq = self.scheduler.get(request_id)
        if seq is not None:
            self._drop(seq)  # its row, generator and any KV waiting to be written back
        elif self.sampler is not None:
            self.sampler.remove(request_id)  # parked: its kept generator
        if self.grammars is not None:
            self.grammars.remove(request_id)
        self.parked.drop(request_id)

    def _make_room(self) -> None:
        """Paused requests' KV gives way to the running rows' reservations: the oldest goes first."""
        budget = self.config.scheduler.kv_cache_tokens - self.scheduler.reserved_tokens()
        dropped = self.parked.shrink(max(0, budget))
        if dropped:
            log.debug("dropped the kept KV of %d paused requests for room", dropped)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def close(self) -> None:
        pass  # the model goes with the process

    def idle(self) -> None:
        if self.runner is not None and self.runner.cache.rows_cap:
            self.runner.cache.release()

    def stats(self) -> EngineStats:
        s = self.scheduler
        cache = self.runner.cache if self.runner else None
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            max_batch_size=self.config.scheduler.max_batch_size,
            kv_cache_tokens_used=sum(q.length for q in list(s.running)),
            kv_cache_tokens_capacity=(cache.rows_cap * cache.len_cap) if cache is not None else 0,
            kv_cache_tokens_paused=self.parked.tokens + sum(k.tokens for k in self._restore.values()),
            kv_cache_tokens_budget=self.config.scheduler.kv_cache_tokens,
        )

    # -- the step
    def step(self) -> StepOutput:
        assert self.runner is not None
        runner, sched = self.runner, self.scheduler
        out = StepOutput()
        for request_id, error in self._refused.items():
            seq = sched.get(request_id)
            if seq is not None:
                out.failed[request_id] = error
                self._drop(seq)
        self._refused.clear()
        plan = sched.schedule()
        out.scheduled = [s.request_id for s in plan.admitted]
        try:
            if plan.admitted and self.parked:
                self._make_room()
            if sched.running:
                # +2: room for the token being fed, and the scratch column (kv_cache.py) above every sequence
                runner.cache.ensure(len(sched.running), max(s.length + 2 for s in sched.running))
            for seq in plan.admitted:  # a continued request's kept KV goes back into its new row
                kept = self._restore.pop(seq.request_id, None)
                if kept is not None:
                    runner.cache.write_row(seq.row, kept.keys, kept.values)
            # Prefill first: its chunks sit in consecutive rows from num_decode, in order, exactly as scheduled.
            # Promotions and finishes that follow only move rows >= num_decode, so the decode rows below stay
            # put. (Decoding first would let a finishing sequence reorder the prefill rows under the chunks.)
            chunks = [c for c in plan.prefill if c.seq.state is SeqState.PREFILL]
            if chunks:  # one batched forward for all of them
                ran, logits = self._forward_isolated(
                    [c.seq for c in chunks],
                    lambda: runner.prefill(
                        chunks[0].seq.row,
                        [c.seq.prompt_ids[c.start : c.end] for c in chunks],
                        [c.start for c in chunks],
                    ),
                    lambda i: runner.prefill(
                        chunks[i].seq.row,
                        [chunks[i].seq.prompt_ids[chunks[i].start : chunks[i].end]],
                        [chunks[i].start],
                    ),
                    out,
                )
                for i in ran:
                    chunks[i].seq.num_computed = chunks[i].end
                done = [j for j, i in enumerate(ran) if chunks[i].is_last]
                for j in done:
                    self._apply(sched.promote(chunks[ran[j]].seq))
                if done:
                    self._sample([chunks[ran[j]].seq for j in done], logits[done], out)
            if plan.num_decode:
                decoding = sched.running[: plan.num_decode]
                ran, logits = self._forward_isolated(
                    decoding,
                    lambda: runner.decode([s.output_ids[-1] for s in decoding], [s.length - 1 for s in decoding]),
                    lambda i: runner.decode([decoding[i].output_ids[-1]], [decoding[i].length - 1], decoding[i].row),
                    out,
                )
                if ran:
                    self._sample([decoding[i] for i in ran], logits, out)
        except Exception as exc:  # outside the forward passes (the cache could not grow): nothing is consistent
            log.exception("model step failed")
            for seq in list(sched.running):
                out.failed[seq.request_id] = EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {exc}")
                out.tokens.pop(seq.request_id, None)
                self._drop(seq)
            runner.cache.release()
        return out

    def _forward_isolated(
        self,
        seqs: list[Sequence],
        batched: Callable[[], torch.Tensor],
        alone: Callable[[int], torch.Tensor],
        out: StepOutput,
    ) -> tuple[list[int], torch.Tensor]:
        """Run ``batched`` (one forward pass for ``seqs``); if it fails, run each sequence ``alone`` so that only the
        ones that fail by themselves fail. Returns the indexes into ``seqs`` that ran, and their logits [k, V].
        Rewriting a row's KV positions is idempotent, so running a row again after a failed batch is safe."""
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
        assert self.sampler is not None
        if self.grammars is not None:
            self.grammars.mask(logits, [s.request_id for s in seqs])
        tokens = self.sampler.sample(
            logits,
            [s.request_id for s in seqs],
            [s.params for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.penalized_ids for s in seqs],
        )
        for seq, token in zip(list(seqs), tokens, strict=True):
            if seq.state is SeqState.FINISHED:
                continue
            if isinstance(token, SamplingFailure):
                log.warning("request %s could not be sampled: %s", seq.request_id, token.reason)
                out.failed[seq.request_id] = EngineError(
                    EngineErrorCode.GENERATION_FAILED, f"generation failed: {token.reason}"
                )
                self._drop(seq)
                continue
            refused = self.grammars.consume(seq.request_id, token) if self.grammars is not None else None
            if refused is not None:  # cannot happen with the mask applied; never send a token the schema refuses
                out.failed[seq.request_id] = EngineError(
                    EngineErrorCode.GENERATION_FAILED, f"generation failed: the schema refused a token: {refused}"
                )
                self._drop(seq)
                continue
            seq.output_ids.append(token)
            out.tokens[seq.request_id] = [token]

    def _drop(self, seq: Sequence) -> None:
        assert self.sampler is not None
        self._apply(self.scheduler.remove(seq))
        self.sampler.remove(seq.request_id)
        self._restore.pop(seq.request_id, None)
        if self.grammars is not None:
            self.grammars.remove(seq.request_id)

    def _apply(self, swaps: list[Swap]) -> None:
        assert self.runner is not None
        for i, j in swaps:
            self.runner.cache.swap_rows(i, j)


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
