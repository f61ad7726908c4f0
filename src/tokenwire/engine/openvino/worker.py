"""The OpenVINO engine's own process: a ``ContinuousBatchingPipeline`` and the loop that steps it.

The pipeline's ``step()`` holds the GIL for its whole duration (measured with 32 decoding streams: a 1 ms sleep
in another thread overshot by 41 ms at the median), so in a thread it would stall the server's event loop. It
lives here, in a child process; the server's process keeps tokenizing, detokenizing and the sockets
(engine/openvino/engine.py). One pipe joins them, carrying small pickled messages:

    server -> worker:  Add(key, prompt ids, sampling params, max new tokens) | Remove(key) | None (stop)
    worker -> server:  Loaded once, then one Stepped per pipeline step (new token ids per key, the keys that
                       ended inside the pipeline and how, the pipeline's counters)

Keys are ints the server hands out and never reuses, so a late token of a removed request cannot be taken for a
newer request's. Every ``GenerationHandle`` is held until its request ends: a collected handle cancels it.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tokenwire.engine.interface import SamplingParams
from tokenwire.engine.prefix import PrefixIndex

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # how long an idle worker waits for a message before checking again


@dataclass(slots=True, frozen=True)
class WorkerConfig:
    model: str  # a .gguf file or an OpenVINO IR folder
    device: str  # OpenVINO device: CPU, GPU (Intel's), ...
    properties: dict[str, str | int]  # compile properties: INFERENCE_NUM_THREADS, KV_CACHE_PRECISION, CACHE_DIR...
    max_num_seqs: int  # sequences scheduled together at most
    kv_cache_blocks: int  # KV-cache size in blocks of the pipeline's block size
    block_tokens: int  # the pipeline's block size (tokens)
    max_batched_tokens: int  # tokens per step (prefill chunks + decodes)
    prefix_caching: bool


@dataclass(slots=True, frozen=True)
class Add:
    key: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    grammar: str | None = None  # structured output: the EBNF its text must follow (from where it is)


@dataclass(slots=True, frozen=True)
class Remove:
    key: int


@dataclass(slots=True, frozen=True)
class Loaded:
    error: str | None = None  # why the model could not be loaded
    seconds: float = 0.0


@dataclass(slots=True)
class Stepped:
    """What one step made. ``ended``: keys the pipeline finished by itself (None) or failed (the reason)."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    ended: dict[int, str | None] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)  # prompt tokens found in the prefix cache, on admission
    requests: int = 0  # in the pipeline
    scheduled: int = 0  # of them, scheduled in this step
    cache_usage: float = 0.0  # percent of the KV cache in use


def generation_config(params: SamplingParams, max_new_tokens: int, grammar: str | None = None) -> Any:
    """The pipeline's ``GenerationConfig`` for tokenwire's sampling parameters: every one is carried over, and
    ``grammar`` (EBNF) constrains the text (the server compiles a JSON Schema to it: engine/grammar/).

    Stop strings and end-of-sequence are the server's (engine/output.py): it sees every token and removes the
    request, so the pipeline is told only about ``ignore_eos``. Without a seed a random one is drawn: the
    pipeline's default seed is the same for every request, which would give every unseeded request one text."""
    import openvino_genai as og

    gc = og.GenerationConfig()
    gc.max_new_tokens = max(1, max_new_tokens)  # 0: the prompt fills the context; the output side ends it at once
    gc.ignore_eos = params.ignore_eos
    gc.num_return_sequences = 1
    gc.repetition_penalty = params.repetition_penalty
    gc.presence_penalty = params.presence_penalty
    gc.frequency_penalty = params.frequency_penalty
    if grammar is not None:
        gc.structured_output_config = og.StructuredOutputConfig(grammar=grammar)
    if params.greedy:
        gc.do_sample = False
    else:
        gc.do_sample = True
        gc.temperature = params.temperature
        gc.top_p = params.top_p
        if params.top_k > 0:
            gc.top_k = params.top_k
        if params.min_p >= 1.0:  # keep only the likeliest token(s); the pipeline takes min_p below 1 only
            gc.top_k = 1
        else:
            gc.min_p = params.min_p
        gc.rng_seed = params.seed if params.seed is not None else random.getrandbits(63)
    return gc


def load(config: WorkerConfig) -> Any:
    import openvino_genai as og

    sc = og.SchedulerConfig()
    sc.num_kv_blocks = config.kv_cache_blocks
    sc.max_num_seqs = config.max_num_seqs
    sc.max_num_batched_tokens = config.max_batched_tokens
    sc.dynamic_split_fuse = True  # long prompts are prefilled in chunks next to the running decodes
    sc.enable_prefix_caching = config.prefix_caching
    return og.ContinuousBatchingPipeline(config.model, sc, config.device, dict(config.properties))


def main(conn: Connection, config: WorkerConfig) -> None:
    """The child process: load, say so, then serve the pipe until told to stop or the server goes away.

    It ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches the whole foreground process group, and systemd's
    default ``KillMode=control-group`` signals every process of a service, but only the server decides when the
    model stops (after its drain); it then ends this process itself. Set here, not by the parent: a worker is
    restarted from the model thread, where Python cannot set signal handlers. The server's death still ends it
    (the pipe's end of file)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s openvino-worker: %(message)s")
    started = time.monotonic()
    try:
        pipe = load(config)
    except Exception as exc:
        conn.send(Loaded(error=f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Loaded(seconds=time.monotonic() - started))
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the server is gone
        Worker(
            conn, pipe, PrefixIndex(config.block_tokens, config.kv_cache_blocks) if config.prefix_caching else None
        ).run()


class Worker:
    def __init__(self, conn: Connection, pipe: Any, prefix: PrefixIndex | None = None) -> None:
        import openvino as ov
        import openvino_genai as og

        self._ov = ov
        self._running = og.GenerationStatus.RUNNING
        self._finished = og.GenerationStatus.FINISHED
        self.conn = conn
        self.pipe = pipe
        self.handles: dict[int, Any] = {}
        self.cancelled: list[Any] = []  # handles cancelled since the last step, held until it ran
        self.pending = Stepped()  # what goes out with the next Stepped (failures outside a step)
        # The prefix cache as the pipeline keeps it (it does not say what it reused): see engine/prefix.py. A
        # prompt's blocks are cached once computed (its first token), the rest of a sequence when it ends.
        self.prefix = prefix
        self.sequences: dict[int, list[int]] = {}  # key -> prompt + generated ids (prefix caching only)
        self.prompt_lens: dict[int, int] = {}

    def run(self) -> None:
        while True:
            if not self.receive(wait=not self.handles):
                return
            if self.handles:
                self.step()

    def receive(self, wait: bool) -> bool:
        """Apply the messages that are there (waiting for one if ``wait``). False: stop."""
        conn = self.conn
        if wait and not conn.poll(IDLE_POLL_S):
            return True
        while conn.poll():
            msg = conn.recv()
            if msg is None:
                return False
            if isinstance(msg, Add):
                self.add(msg)
            elif isinstance(msg, Remove):
                handle = self.handles.pop(msg.key, None)
                if handle is not None:
                    handle.cancel()
                    self.cancelled.append(handle)
                    self.forget(msg.key)
        if self.pending.ended and not self.handles:
            self.flush(Stepped())
        return True

    def add(self, msg: Add) -> None:
        import numpy as np

        try:
            ids = self._ov.Tensor(np.array([msg.prompt_ids], dtype=np.int64))
            config = generation_config(msg.params, msg.max_new_tokens, msg.grammar)
            self.handles[msg.key] = self.pipe.add_request(msg.key, ids, config)
            if self.prefix is not None:
                self.pending.cached[msg.key] = self.prefix.match(msg.prompt_ids)
                self.sequences[msg.key] = list(msg.prompt_ids)
                self.prompt_lens[msg.key] = len(msg.prompt_ids)
        except Exception as exc:  # a request the pipeline refuses fails alone
            log.warning("request %d refused by the pipeline: %s", msg.key, exc)
            self.pending.ended[msg.key] = f"the OpenVINO pipeline refused the request: {exc}"

    def step(self) -> None:
        out = Stepped()
        try:
            self.pipe.step()
        except Exception as exc:  # the step is opaque: every request in it fails (inputs were validated before)
            log.error("pipeline step failed: %s", "".join(traceback.format_exception_only(exc)).strip())
            for key, handle in self.handles.items():
                handle.cancel()
                self.cancelled.append(handle)
                out.ended[key] = f"generation failed: {exc}"
                self.sequences.pop(key, None)
                self.prompt_lens.pop(key, None)
            self.handles.clear()
        self.cancelled.clear()
        for key, handle in list(self.handles.items()):
            got: list[int] = []
            while handle.can_read():
                for seq in handle.read().values():
                    got.extend(seq.generated_ids)
            if got:
                out.tokens[key] = got
                self.remember(key, got)
            status = handle.get_status()
            if status != self._running:
                del self.handles[key]
                out.ended[key] = None if status == self._finished else f"the pipeline dropped the request ({status})"
                self.forget(key)
        metrics = self.pipe.get_metrics()
        out.requests = int(metrics.requests)
        out.scheduled = int(metrics.scheduled_requests)
        out.cache_usage = float(metrics.cache_usage)
        self.flush(out)

    def remember(self, key: int, got: list[int]) -> None:
        seq = self.sequences.get(key)
        if seq is None or self.prefix is None:
            return
        if len(seq) == self.prompt_lens[key]:  # the first token: the prompt's KV is computed and shared from now
            self.prefix.insert(seq)
        seq.extend(got)

    def forget(self, key: int) -> None:
        """A sequence ended: the cache keeps the KV of all but its last token."""
        seq = self.sequences.pop(key, None)
        prompt_len = self.prompt_lens.pop(key, 0)
        if seq is not None and self.prefix is not None and len(seq) > prompt_len:  # else: maybe never computed
            self.prefix.insert(seq[:-1])

    def flush(self, out: Stepped) -> None:
        if self.pending.ended:
            out.ended = {**self.pending.ended, **out.ended}
            self.pending.ended.clear()
        if self.pending.cached:
            out.cached = {**self.pending.cached, **out.cached}
            self.pending.cached.clear()
        self.conn.send(out)
