"""HFEngine: the transformers backend of the :class:`~tokenwire.engine.interface.Engine` contract.

One thread owns the model. Each step it drains its inbox (new requests, aborts), asks the scheduler what
to run, runs prefill chunks and one batched decode step, samples, detokenizes, and hands the step's
outputs to the event loop in one ``call_soon_threadsafe``. The event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenwire.engine.detokenizer import IncrementalDetokenizer
from tokenwire.engine.hf import loader
from tokenwire.engine.hf.quant import quantize_int8
from tokenwire.engine.hf.runner import ModelRunner
from tokenwire.engine.hf.sampler import RowSampler, SamplingFailure
from tokenwire.engine.interface import (
    EngineError,
    EngineStats,
    ErrorCode,
    FinishReason,
    GenerationRequest,
    GenerationStart,
    OutputKind,
    RequestOutput,
)
from tokenwire.engine.prompt import Prompt, PromptBuilder
from tokenwire.engine.scheduler import Scheduler, SchedulerConfig, Swap
from tokenwire.engine.sequence import SeqState, Sequence
from tokenwire.engine.stop import StopStringFilter

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


@dataclass(slots=True, frozen=True)
class _Add:
    request: GenerationRequest
    prompt: Prompt
    submitted_at: float


@dataclass(slots=True, frozen=True)
class _Abort:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Failure:
    request_id: str
    error: EngineError


_Item = RequestOutput | _Failure


class HFEngine:
    """Serves any transformers causal LM with continuous batching over a slot KV cache."""

    def __init__(self, config: HFEngineConfig) -> None:
        """Resolves the model reference and checks the settings at once (ValueError); loading is in start()."""
        _pick_dtype(config.dtype, torch.device("cpu"))  # an unknown dtype fails here, not after a long load
        if config.quantize not in ("none", "int8"):
            raise ValueError(f"unknown quantize {config.quantize!r}; choose none or int8")
        self.config = config
        self._resolved = loader.resolve(config.model)
        self._model_name = self._resolved.name
        self._max_context = config.max_model_len
        self._ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._scheduler = Scheduler(config.scheduler)
        self._steps = 0
        self._runner: ModelRunner | None = None
        self._sampler: RowSampler | None = None
        self._prompts: PromptBuilder | None = None
        # Prompts are tokenized here, one at a time, never in the model thread: a long prompt costs its sender
        # the time, not every running stream (the tokenizer releases the GIL while it works).
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-tokenize")
        self._tokenizer: Any = None
        self._eos: set[int] = set()

    # -- Engine properties
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # -- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._load_and_run, args=(loaded,), name="tokenwire-engine", daemon=True)
        self._thread.start()
        await loaded
        self._ready = True

    def _load_and_run(self, loaded: asyncio.Future[None]) -> None:
        """Load the model, then run the loop, in this one thread. Every torch operation runs here, so there is one
        OpenMP thread team: a second one, left idle by a separate loading thread, made each parallel region of the
        later steps pay a wake-up (int8 decode steps took twice as long, bench/results/ab-int8-cpu.md)."""
        loop = self._loop
        assert loop is not None
        try:
            self._load()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody waits
                loop.call_soon_threadsafe(_settle, loaded, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, loaded, None)
        self._run()

    def _load(self) -> None:
        cfg = self.config
        device = torch.device(_pick_device(cfg.device))
        dtype = _pick_dtype(cfg.dtype, device)
        if device.type == "cpu" and cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        log.info("loading %s on %s as %s", self._model_name, device, str(dtype).removeprefix("torch."))
        model, tok = loader.load(self._resolved, str(device), dtype)
        if cfg.quantize == "int8":
            if device.type == "cpu":
                log.info("int8 weights for small decode batches: %d layers", quantize_int8(model))
            else:
                log.warning("--quantize int8 is for CPU; %s uses the %s weights as they are", device, dtype)
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_len = getattr(text_cfg, "max_position_embeddings", None) or cfg.max_model_len
        self._max_context = min(cfg.max_model_len, int(model_len))
        self._runner = ModelRunner(model, device, dtype)
        self._sampler = RowSampler(device)
        self._prompts = PromptBuilder(tok, self._max_context)
        self._tokenizer = tok
        self._eos = _eos_ids(model, tok)
        log.info("model ready: %s, context %d tokens", self._model_name, self._max_context)

    async def shutdown(self) -> None:
        self._ready = False
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        for rid, q in list(self._streams.items()):
            q.put_nowait(_Failure(rid, EngineError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")))

    # -- requests (event loop side)
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        if not self._ready:
            raise EngineError(
                ErrorCode.SHUTTING_DOWN if self._stopping else ErrorCode.OVERLOADED, "the engine is not ready"
            )
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(ErrorCode.DUPLICATE_ID, f"request id {rid!r} is already running", "id")
        limits = self.config.scheduler
        if len(self._streams) >= limits.max_batch_size + limits.max_waiting:
            raise EngineError(ErrorCode.OVERLOADED, "too many requests are in flight; try again later")
        # Unbounded in type, bounded in fact: the model thread puts at most one item per step per request,
        # and the stream ends after max_tokens steps.
        stream: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[rid] = stream
        submitted_at = time.monotonic()
        finished = False
        try:
            prompt = await self._tokenize(request)
            self._inbox.put(_Add(request, prompt, submitted_at))
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
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away: free the slot
                self._inbox.put(_Abort(rid))

    async def _tokenize(self, request: GenerationRequest) -> Prompt:
        prompts = self._prompts
        assert prompts is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenizing, prompts.build, request)
        except EngineError:
            raise
        except Exception as exc:  # the tokenizer refused the input: this request fails, nothing else
            log.warning("could not tokenize request %s: %s", request.request_id, exc)
            raise EngineError(ErrorCode.INVALID_REQUEST, f"the prompt could not be tokenized: {exc}", "prompt") from exc

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        s = self._scheduler
        cache = self._runner.cache if self._runner else None
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            max_batch_size=self.config.scheduler.max_batch_size,
            kv_cache_tokens_used=sum(q.length for q in list(s.running)),
            kv_cache_tokens_capacity=(cache.rows_cap * cache.len_cap) if cache is not None else 0,
            steps=self._steps,
        )

    def _deliver(self, items: list[_Item]) -> None:
        """Event loop: route one step's outputs to their streams."""
        for item in items:
            stream = self._streams.get(item.request_id)
            if stream is not None:  # None: the consumer left; its abort is on the way
                stream.put_nowait(item)

    # -- the model thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._drain_inbox(block=not self._scheduler.has_work):
                    break
                if self._scheduler.has_work:
                    self._step()
        except Exception:  # pragma: no cover - a bug in the loop itself
            log.exception("engine loop crashed")
            self._ready = False
        finally:
            self._fail_all(ErrorCode.SHUTTING_DOWN, "the server is shutting down")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts. Returns False when asked to stop."""
        out: list[_Item] = []
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if msg is None:
                    return False
                if isinstance(msg, _Add):
                    self._admit(msg, out)
                else:
                    self._abort(msg.request_id, out)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass
        finally:
            self._emit(out)
        if block and not self._scheduler.has_work and self._runner is not None and self._runner.cache.rows_cap:
            self._runner.cache.release()  # idle: give the memory back
        return True

    def _admit(self, msg: _Add, out: list[_Item]) -> None:
        assert self._sampler is not None
        req, prompt = msg.request, msg.prompt
        room = self._max_context - len(prompt.token_ids)
        seq = Sequence(
            request=req,
            prompt_ids=prompt.token_ids,
            max_new_tokens=min(req.params.max_tokens, room),
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stop_filter=StopStringFilter(req.params.stop),
            submitted_at=msg.submitted_at,
        )
        self._sampler.add(req.request_id, req.params.seed)
        self._scheduler.add(seq)
        out.append(
            RequestOutput(
                req.request_id,
                OutputKind.STARTED,
                start=GenerationStart(len(prompt.token_ids), prompt.dropped_turns),
                prompt_tokens=len(prompt.token_ids),
            )
        )

    def _abort(self, request_id: str, out: list[_Item]) -> None:
        seq = self._scheduler.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED, out)

    def _step(self) -> None:
        assert self._runner is not None
        runner, sched = self._runner, self._scheduler
        now = time.monotonic()
        plan = sched.schedule(now)
        out: list[_Item] = []
        try:
            if sched.running:
                # +2: room for the token being fed, and the scratch column (kv_cache.py) above every sequence
                runner.cache.ensure(len(sched.running), max(s.length + 2 for s in sched.running))
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
                    self._sample_and_emit([chunks[ran[j]].seq for j in done], logits[done], out)
            if plan.num_decode:
                decoding = sched.running[: plan.num_decode]
                ran, logits = self._forward_isolated(
                    decoding,
                    lambda: runner.decode([s.output_ids[-1] for s in decoding], [s.length - 1 for s in decoding]),
                    lambda i: runner.decode([decoding[i].output_ids[-1]], [decoding[i].length - 1], decoding[i].row),
                    out,
                )
                if ran:
                    self._sample_and_emit([decoding[i] for i in ran], logits, out)
        except Exception as exc:  # outside the forward passes (the cache could not grow): nothing is consistent
            log.exception("model step failed")
            for seq in list(sched.running):
                err = EngineError(ErrorCode.GENERATION_FAILED, f"generation failed: {exc}")
                out.append(_Failure(seq.request_id, err))
                self._drop(seq)
            runner.cache.release()
        self._steps += 1
        self._emit(out)

    def _forward_isolated(
        self,
        seqs: list[Sequence],
        batched: Callable[[], torch.Tensor],
        alone: Callable[[int], torch.Tensor],
        out: list[_Item],
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
            failure = EngineError(ErrorCode.GENERATION_FAILED, f"generation failed: {error}")
            out.append(_Failure(seq.request_id, failure))
            self._drop(seq)
        return ran, torch.cat(rows) if rows else torch.empty(0)

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor, out: list[_Item]) -> None:
        assert self._sampler is not None
        tokens = self._sampler.sample(
            logits,
            [s.request_id for s in seqs],
            [s.request.params for s in seqs],
            [s.prompt_ids for s in seqs],
            [s.output_ids for s in seqs],
        )
        now = time.monotonic()
        for seq, token in zip(list(seqs), tokens, strict=True):
            if seq.state is SeqState.FINISHED:
                continue
            if isinstance(token, SamplingFailure):
                log.warning("request %s could not be sampled: %s", seq.request_id, token.reason)
                error = EngineError(ErrorCode.GENERATION_FAILED, f"generation failed: {token.reason}")
                out.append(_Failure(seq.request_id, error))
                self._drop(seq)
                continue
            self._on_token(seq, token, now, out)

    def _on_token(self, seq: Sequence, token: int, now: float, out: list[_Item]) -> None:
        seq.output_ids.append(token)
        seq.unreported_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token in self._eos and not seq.request.params.ignore_eos:
            self._finish(seq, FinishReason.STOP, out)
            return
        piece = seq.stop_filter.push(seq.detokenizer.push(token))
        if piece.stopped:
            self._finish(seq, FinishReason.STOP, out, piece.text, flush=False)
            return
        if len(seq.output_ids) >= seq.max_new_tokens:
            self._finish(seq, FinishReason.LENGTH, out, piece.text)
            return
        if piece.text:
            out.append(
                RequestOutput(seq.request_id, OutputKind.DELTA, text=piece.text, num_tokens=seq.unreported_tokens)
            )
            seq.unreported_tokens = 0

    def _finish(
        self, seq: Sequence, reason: FinishReason, out: list[_Item], text: str = "", flush: bool = True
    ) -> None:
        """End ``seq``. Unless a stop string cut it, the text still held back is final and goes out too."""
        if flush:
            tail = seq.stop_filter.push(seq.detokenizer.flush())
            text += tail.text
            if tail.stopped:
                reason = FinishReason.STOP
            else:
                text += seq.stop_filter.flush()
        self._drop(seq)
        seq.finish_reason = reason
        out.append(
            RequestOutput(
                seq.request_id,
                OutputKind.FINISHED,
                text=text,
                num_tokens=seq.unreported_tokens,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                timings=seq.timings(time.monotonic()),
            )
        )

    def _drop(self, seq: Sequence) -> None:
        assert self._sampler is not None
        self._apply(self._scheduler.remove(seq))
        self._sampler.remove(seq.request_id)

    def _apply(self, swaps: list[Swap]) -> None:
        assert self._runner is not None
        for i, j in swaps:
            self._runner.cache.swap_rows(i, j)

    def _fail_all(self, code: ErrorCode, message: str) -> None:
        out: list[_Item] = []
        for seq in list(self._scheduler.running) + list(self._scheduler.waiting):
            out.append(_Failure(seq.request_id, EngineError(code, message)))
            self._scheduler.remove(seq)
        self._emit(out)

    def _emit(self, items: list[_Item]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)


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


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled (a shutdown during the load)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


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
