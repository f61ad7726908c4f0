"""The OpenVINO engine: OpenVINO GenAI's continuous-batching pipeline, stepped in a child process.

The engine core (engine/loop.py) runs here as for every backend: tokenizing (with tokenwire's own tokenizer, so
both engines feed a model the same prompt tokens), the output side (end-of-sequence, stop strings, max_tokens,
detokenizing) and the queues to the event loop. Only the model step is elsewhere: :class:`OVBackend` forwards
adds and removes to the worker process (worker.py) and each of its steps returns what the worker's steps made.

    event loop --GenerationRequest--> tokenize --> model thread --Add/Remove--> worker process (pipeline.step())
    event loop <--RequestOutput------ output side <--------------- Stepped (token ids) --/
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import time
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.backend import LoadedModel, StepOutput
from tokenwire.engine.grammar.compiled import SchemaGrammars
from tokenwire.engine.grammar.residual import NotAPrefix
from tokenwire.engine.grammar.schema import Unsupported
from tokenwire.engine.interface import EngineError, EngineErrorCode, EngineStats, FinishReason, SamplingParams
from tokenwire.engine.loop import LoopEngine
from tokenwire.engine.openvino import convert, ir, kernel_cache, kv, worker
from tokenwire.engine.openvino.model import plan, prepare
from tokenwire.engine.recovery import RestartBudget

log = logging.getLogger(__name__)

BLOCK_TOKENS = 32  # the CPU pipeline's KV-cache block (tokens); --kv-cache-tokens is rounded up to blocks
STEP_WAIT_S = 0.005  # how long a model-thread step waits for the worker before looking at its inbox again
MAX_RESTARTS = 3  # worker deaths within RESTART_WINDOW_S that are restarted; one more and the engine stops
RESTART_WINDOW_S = 300.0  # (a death a culprit request was in does not count: engine/recovery.py)
_PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def kv_blocks(kv_cache_tokens: int) -> int:
    """The pipeline's KV-cache size in blocks for a budget in tokens (rounded up; at least one block)."""
    return max(1, -(-kv_cache_tokens // BLOCK_TOKENS))


_DEVICES = {"cpu": "CPU", "gpu": "GPU"}


@dataclass(slots=True, frozen=True)
class OVEngineConfig:
    model: str | None = None  # None: the default model
    device: str = "auto"  # auto (CPU) | cpu | gpu (an Intel GPU)
    dtype: str = "auto"  # inference precision: auto (OpenVINO's choice for the CPU) | float32 | bfloat16 | float16
    quantize: str = "auto"  # weights: auto (int8) | none | int8 | int4 (engine/openvino/ir.py; IR folders: auto)
    max_model_len: int = 8192
    threads: int = 0  # 0: all cores
    max_batch_size: int = 64
    max_waiting: int = 1024
    kv_cache_tokens: int = 1 << 17
    max_prefill_tokens: int = 512
    prefix_caching: bool = True
    queue_timeout: float = 60.0  # seconds a new request may wait for a row before it fails overloaded (0: no limit)
    hang_timeout: float = 120.0  # a worker silent this long while it has requests hangs: it is restarted (0: never)
    json_whitespace: str = "compact"  # structured output: compact JSON, or flexible (whitespace between tokens)


def worker_config(
    cfg: OVEngineConfig, source: str, properties: dict[str, str | int] | None = None, kv_tokens: int | None = None
) -> worker.WorkerConfig:
    """How the worker runs the pipeline on ``source`` for the settings ``cfg`` (``properties``: more compile
    properties, for experiments; ``kv_tokens``: the KV cache's size, if not ``cfg.kv_cache_tokens``)."""
    props: dict[str, str | int] = {"CACHE_DIR": str(kernel_cache.folder())}
    if cfg.threads > 0:
        props["INFERENCE_NUM_THREADS"] = cfg.threads
    if cfg.dtype != "auto":
        props["INFERENCE_PRECISION_HINT"] = _PRECISIONS[cfg.dtype]
    return worker.WorkerConfig(
        model=source,
        device=_DEVICES.get(cfg.device, "CPU"),
        properties={**props, **(properties or {})},
        max_num_seqs=cfg.max_batch_size,
        kv_cache_blocks=kv_blocks(cfg.kv_cache_tokens if kv_tokens is None else kv_tokens),
        block_tokens=BLOCK_TOKENS,
        max_batched_tokens=max(cfg.max_prefill_tokens, cfg.max_batch_size),
        prefix_caching=cfg.prefix_caching,
    )


class OVEngine(LoopEngine):
    """Serves a GGUF file or an OpenVINO IR folder with OpenVINO GenAI's continuous batching."""

    backend: OVBackend

    def __init__(self, config: OVEngineConfig) -> None:
        """Resolves the model and checks the settings at once (ValueError); loading is in start()."""
        backend = OVBackend(config)
        super().__init__(
            backend, backend.name, config.max_batch_size + config.max_waiting, config.queue_timeout, config.hang_timeout
        )


class OVBackend:
    """The model thread's side of the worker process: a :class:`~tokenwire.engine.loop.Backend`."""

    kind = "openvino"

    def __init__(self, config: OVEngineConfig) -> None:
        if config.dtype not in ("auto", *_PRECISIONS):
            raise ValueError(f"unknown dtype {config.dtype!r}; choose one of auto, {', '.join(_PRECISIONS)}")
        if config.device not in ("auto", *_DEVICES):
            raise ValueError(f"the openvino engine runs on cpu or gpu (an Intel GPU), not {config.device!r}")
        if config.json_whitespace not in ("compact", "flexible"):
            raise ValueError(f"--json-whitespace must be compact or flexible, not {config.json_whitespace!r}")
        self.config = config
        self.resolved = models.resolve(config.model)
        self.plan = plan(self.resolved)  # NotForOpenVINO (a ValueError) if OpenVINO cannot read it
        allowed = ("auto",) if self.plan.as_is else ("auto", *ir.FORMATS)
        if config.quantize not in allowed:
            raise ValueError(
                f"--quantize {config.quantize} is not available here: an OpenVINO IR folder is run with the weights "
                "it has (auto); a GGUF file or Hugging Face folder takes auto, none, int8 or int4"
            )
        self.source = str(self.plan.source)
        self.name = self.resolved.name
        self._keys: dict[str, int] = {}  # request id -> worker key
        self._rids: dict[int, str] = {}
        self._next_key = count(1)
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self._alive = False
        self._last = worker.Stepped()
        self._deaths = RestartBudget(MAX_RESTARTS, RESTART_WINDOW_S)  # restarts are bounded
        self._wcfg: worker.WorkerConfig | None = None
        self._heard = time.monotonic()  # the worker's last message, or when it was last given work while idle
        self.grammars = SchemaGrammars(compact=config.json_whitespace == "compact")
        self._tokenizer: Any = None
        self._refused: dict[str, EngineError] = {}  # requests that could not be handed to the worker, and why
        self.kv_tokens = config.kv_cache_tokens  # the KV cache's size (load: at most what kv.KV_BYTES hold)

    # -- lifecycle
    def load(self) -> LoadedModel:
        """Start the worker (it loads the weights), read the tokenizer meanwhile, then wait for the worker."""
        cfg = self.config
        self.source = self.plan.weights(cfg.quantize)  # made into IR here, once
        self.kv_tokens = self._kv_tokens()
        wcfg = worker_config(cfg, self.source, kv_tokens=self.kv_tokens)
        kernel_cache.prune(kernel_cache.folder())
        log.info("loading %s with OpenVINO on %s in a worker process", self.name, wcfg.device)
        self._wcfg = wcfg
        ours, process = self._start()
        try:
            prepared = prepare(self.plan, cfg.max_model_len)
            seconds = self._await_loaded(ours, process)
        except BaseException:
            if process.is_alive():
                process.kill()
            raise
        self._conn, self._process, self._alive = ours, process, True
        self._tokenizer = prepared.tokenizer
        log.info(
            "model ready: %s, context %d tokens (OpenVINO, weights loaded in %.1f s)",
            self.name,
            prepared.max_context,
            seconds,
        )
        return LoadedModel(prepared.tokenizer, prepared.eos_ids, prepared.max_context)

    def _kv_tokens(self) -> int:
        """--kv-cache-tokens, at most what kv.KV_BYTES hold for this model (at least one context)."""
        cfg, found = self.config, self.plan
        source = convert.converted(found.source) if found.convert else found.source
        return kv.size_for(cfg.kv_cache_tokens, source, _DEVICES.get(cfg.device, "CPU"), cfg.max_model_len)

    def _start(self) -> tuple[Connection, BaseProcess]:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=worker.main, args=(theirs, self._wcfg), name="tokenwire-openvino", daemon=True)
        process.start()
        theirs.close()
        # The worker ignores SIGTERM (worker.main), and multiprocessing's exit handler sends a daemon child SIGTERM
        # and then waits for it without a timeout: an exit that skipped close() would hang there. This runs first.
        atexit.register(_end, process)
        return ours, process

    def _await_loaded(self, ours: Connection, process: BaseProcess) -> float:
        """Wait for the worker's Loaded; the seconds its load took (RuntimeError if it could not load)."""
        try:
            loaded = ours.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(f"the OpenVINO worker process exited while loading (code {process.exitcode})") from None
        if loaded.error is not None:
            process.join(5)
            raise RuntimeError(f"OpenVINO could not load {self.source}: {loaded.error}")
        return float(loaded.seconds)

    @property
    def alive(self) -> bool:
        return self._alive

    def close(self) -> None:
        conn, process = self._conn, self._process
        self._alive = False
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        if process is not None:
            _end(process, wait=5.0)

    # -- requests
    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        # A continued request (continued > 0) is a new request to the pipeline: its prefix cache holds the blocks of
        # the prompt and tokens so far; its presence and frequency penalties count only what it generates from here.
        if not self._keys:
            self._heard = time.monotonic()  # silence while idle is not a hang
        grammar = None
        if params.json_schema is not None:
            try:
                grammar = self._grammar(params.json_schema, prompt_ids[len(prompt_ids) - continued :])
            except (Unsupported, NotAPrefix) as exc:
                self._refused[request_id] = EngineError(
                    EngineErrorCode.GENERATION_FAILED, f"the answer's JSON cannot be continued: {exc}", "json_schema"
                )
                return
        key = next(self._next_key)
        self._keys[request_id] = key
        self._rids[key] = request_id
        self._send(worker.Add(key, list(prompt_ids), params, max_new_tokens, grammar))

    def _grammar(self, schema: str, generated: list[int]) -> str:
        """The EBNF for a constrained request; one that goes on after ``generated`` (its own tokens, back from a
        pause or a worker restart) continues its document where the text is, not from its start."""
        text = self._tokenizer.decode(generated, skip_special_tokens=False) if generated else ""
        if text.endswith("\ufffd"):  # a character cut between tokens: the grammar reads whole characters
            raise NotAPrefix("the text so far ends inside a character")
        return self.grammars.ebnf(schema, text)

    def refuse(self, params: SamplingParams) -> EngineError | None:
        """What this engine cannot honour, named: a JSON Schema keyword its grammar compiler (engine/grammar/)
        does not enforce, numeric bounds among them, is refused rather than half kept."""
        if params.json_schema is None:
            return None
        reason = self.grammars.refusal(params.json_schema)
        if reason is None:
            return None
        return EngineError(
            EngineErrorCode.INVALID_REQUEST,
            f"the OpenVINO engine cannot enforce {reason} in a JSON Schema; change the schema, or serve with "
            "--engine transformers, which does",
            "json_schema",
        )

    def park(self, request_id: str) -> None:
        self.remove(request_id)  # the pipeline's prefix cache keeps the blocks while it has room

    def remove(self, request_id: str) -> None:
        self._refused.pop(request_id, None)
        key = self._keys.pop(request_id, None)
        if key is not None and self._rids.pop(key, None) is not None:
            self._send(worker.Remove(key))

    @property
    def has_work(self) -> bool:
        return bool(self._keys) or bool(self._refused)

    def idle(self) -> None:
        pass  # the worker frees a request's KV blocks when it ends

    def stats(self) -> EngineStats:
        last = self._last
        capacity = kv_blocks(self.kv_tokens) * BLOCK_TOKENS
        busy = bool(self._keys)  # the worker reports only while it has requests: its last counters may be stale
        return EngineStats(
            running=last.scheduled if busy else 0,
            waiting=max(0, last.requests - last.scheduled) if busy else 0,
            max_batch_size=self.config.max_batch_size,
            kv_cache_tokens_used=round(capacity * last.cache_usage / 100) if busy else 0,
            kv_cache_tokens_capacity=capacity,
            kv_cache_tokens_budget=capacity,  # allocated whole at start
            backend=self.kind,
        )

    # -- the step
    def step(self) -> StepOutput:
        """What the worker made since the last call (all of its steps, merged in order); waits a little for it."""
        out = StepOutput(steps=0)
        out.failed.update(self._refused)
        self._refused.clear()
        conn = self._conn
        if conn is None or not self._alive:
            return out
        try:
            if not conn.poll(STEP_WAIT_S):
                self._check_silence(out)
                return out
            while conn.poll():
                self._merge(conn.recv(), out)
            self._heard = time.monotonic()
        except (EOFError, OSError):
            self._died(out)
        return out

    def _check_silence(self, out: StepOutput) -> None:
        """A worker with requests that has said nothing for ``hang_timeout`` hangs: kill it, which fails its
        requests and starts a new one (as when it dies)."""
        limit = self.config.hang_timeout
        silent = time.monotonic() - self._heard
        if limit <= 0 or not self._keys or silent <= limit:
            return
        log.error("the OpenVINO worker has not answered for %.0f s with %d requests: it hangs", silent, len(self._keys))
        if self._process is not None:
            self._process.kill()
        self._died(out)
        self._heard = time.monotonic()

    def _merge(self, msg: worker.Stepped, out: StepOutput) -> None:
        self._last = msg
        out.steps += 1
        for key, ids in msg.tokens.items():
            rid = self._rids.get(key)
            if rid is not None:  # None: removed here already; these are its last tokens, unwanted
                out.tokens.setdefault(rid, []).extend(ids)
        for key, cached in msg.cached.items():
            rid = self._rids.get(key)
            if rid is not None:
                out.cached[rid] = cached
        for key, reason in msg.ended.items():
            rid = self._rids.pop(key, None)
            if rid is None:
                continue
            del self._keys[rid]
            if reason is None:  # finished in the pipeline: the output side most likely ended it already
                out.finished[rid] = FinishReason.STOP
            else:
                out.failed[rid] = EngineError(EngineErrorCode.GENERATION_FAILED, reason)

    def _died(self, out: StepOutput) -> None:
        """The worker is gone: restart it, and hand its requests back to the engine core, which queues them again
        where they were (``out.lost``; engine/recovery.py); past the restart limit, or if it cannot be restarted,
        they fail and the engine stops."""
        process = self._process
        if process is not None:
            process.join(1)
        code = process.exitcode if process is not None else None
        lost = list(self._keys)
        self._keys.clear()
        self._rids.clear()
        log.error("the OpenVINO worker process exited (code %s) with %d requests", code, len(lost))
        why = f"the engine process exited (code {code})"
        if not self._deaths.died(lost, time.monotonic()):
            log.error(
                "the worker died %d times in %.0f s: not restarting it", len(self._deaths.deaths), RESTART_WINDOW_S
            )
            self._alive = False
        else:
            log.warning("restarting the OpenVINO worker; its requests, and those that arrive meanwhile, wait for it")
            try:
                ours, process = self._start()
                seconds = self._await_loaded(ours, process)
            except Exception as exc:
                log.error("the OpenVINO worker could not be restarted: %s", exc)
                self._alive = False
                why = f"{why}, and could not be restarted: {exc}"
            else:
                if self._conn is not None:
                    self._conn.close()
                self._conn, self._process = ours, process
                log.info("the OpenVINO worker is back (weights loaded in %.1f s)", seconds)
                out.lost.extend(lost)
                return
        for rid in lost:
            out.failed[rid] = EngineError(EngineErrorCode.GENERATION_FAILED, why)

    def forgive(self, request_id: str) -> None:
        self._deaths.forgive(request_id)

    def _send(self, msg: Any) -> None:
        if self._conn is None or not self._alive:
            return
        with contextlib.suppress(OSError):  # the worker is gone; the next step notices and fails its requests
            self._conn.send(msg)


def _end(process: BaseProcess, wait: float = 0.0) -> None:
    """End a worker: give it ``wait`` seconds to stop by itself (it was told to), then kill it; it ignores the
    signals a terminal or a service manager sends."""
    if wait > 0:
        process.join(wait)
    if process.is_alive():
        process.kill()
        process.join(5)
