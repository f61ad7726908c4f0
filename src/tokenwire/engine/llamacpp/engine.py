"""The llamacpp backend: llama.cpp's kernels under tokenwire's scheduler (engine/loop.py runs the loop around it).

Each step asks the scheduler what to run, puts every decoding request's next token and this step's prompt chunks in
one batch, runs it with one ``llama_decode``, and samples one token per row that finished its prompt or decoded, as
the transformers backend does (tokenwire's sampler and schema masks over llama.cpp's logits). Each request is a
llama.cpp sequence in one unified KV cache; the scheduler's block pool counts its cells (admission, the budget).
A request that ends or is paused keeps its cells while room allows (kept.py): a paused one goes on from them, and a
new prompt starting with the same tokens (a shared system prompt, a chat's previous turn) gets them copied, reported
as ``cached_tokens``. End-of-sequence, stop strings, max_tokens and detokenizing are the engine core's
(engine/output.py). The model is a GGUF file (a Hugging Face folder of a family tokenwire converts is written as
one first: Gemma 2's in llama.cpp's own layout, layout.py); its tokenizer and chat template are read from the file
(as for the OpenVINO engine, cached), or from the folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tokenwire.engine import models
from tokenwire.engine.backend import LoadedModel, StepOutput
from tokenwire.engine.hf.grammar import Grammars
from tokenwire.engine.hf.sampler import RequestSampling
from tokenwire.engine.interface import EngineError, EngineErrorCode, EngineStats, SamplingParams
from tokenwire.engine.llamacpp import layout
from tokenwire.engine.llamacpp.context import MAX_SEQUENCES, DecodeError, Entry, LlamaContext
from tokenwire.engine.llamacpp.kept import Kept, KeptSequences, SequenceIds, common_prefix
from tokenwire.engine.loop import LoopEngine
from tokenwire.engine.scheduler import Scheduler, SchedulerConfig
from tokenwire.engine.sequence import SeqState, Sequence

log = logging.getLogger(__name__)

KV_BYTES = 1 << 30  # llama.cpp allocates its KV cache whole at start: --kv-cache-tokens, at most what 1 GiB holds
# (and at least one whole context): 46k tokens of the default model, 8k of a 7B Llama


@dataclass(slots=True, frozen=True)
class LlamaCppEngineConfig:
    model: str | None = None  # None: the default model
    max_model_len: int = 8192  # context window cap (the model's own limit if smaller)
    threads: int = 0  # llama.cpp's threads; 0 = all cores
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    queue_timeout: float = 60.0  # seconds a new request may wait for a row before it fails overloaded (0: no limit)
    hang_timeout: float = 120.0  # a step longer than this means the model loop hangs: the server stops (0: never)
    json_whitespace: str = "compact"  # structured output: compact JSON, or flexible (whitespace between tokens)
    quantize: str = "auto"  # a folder's matrices: auto or int8 (Q8_0), none (float16); a GGUF file: its own
    flash_attention: int = -1  # llama.cpp's flash attention: -1 its choice, 0 off, 1 on (--flash-attention)


class LlamaCppEngine(LoopEngine):
    """Serves a GGUF file on llama.cpp's kernels with tokenwire's continuous batching, fairness and flow control."""

    backend: LlamaCppBackend

    def __init__(self, config: LlamaCppEngineConfig) -> None:
        """Resolves the model reference and checks the settings at once (ValueError); loading is in start()."""
        backend = LlamaCppBackend(config)
        limits = config.scheduler
        super().__init__(
            backend, backend.name, limits.max_batch_size + limits.max_waiting, config.queue_timeout, config.hang_timeout
        )


def gguf_of(resolved: models.ResolvedModel, matrices: str = "none") -> Path:
    """The GGUF file llama.cpp reads for ``resolved``: the file itself, or a Hugging Face folder tokenwire writes
    as a GGUF file that llama.cpp reads as it means it (:func:`folder_refusal`; Gemma 2 in llama.cpp's own layout),
    once (cached), its matrices float16 (``matrices`` ``none``) or Q8_0 (``int8``). ValueError for anything else."""
    if resolved.gguf_file is not None:
        return Path(resolved.path) / resolved.gguf_file
    from tokenwire.engine.openvino import convert

    check_folder(resolved)
    folder = Path(resolved.path)
    if layout.architecture(folder):
        return layout.converted(folder, matrices)
    return convert.converted(folder, matrices)


def check_folder(resolved: models.ResolvedModel) -> None:
    """ValueError, naming why, unless ``resolved`` is a GGUF file or a folder :func:`gguf_of` can write for llama.cpp
    (cheap: reads the config and the tokenizer)."""
    if resolved.gguf_file is not None:
        return
    from tokenwire.engine.openvino import convert

    folder = Path(resolved.path)
    if not folder.is_dir():
        why: str | None = "it is not a local folder"
    elif layout.architecture(folder):  # a family written in llama.cpp's own layout (Gemma 2)
        why = layout.refusal(folder)
    else:
        why = convert.unsupported(folder) or folder_refusal(folder)
    if why is not None:
        raise ValueError(
            f"the llamacpp engine reads GGUF files, and {resolved.path!r} cannot be given to it as one: {why} "
            "(serve the folder with --engine openvino, or convert it with llama.cpp's convert_hf_to_gguf.py)"
        )


def folder_refusal(folder: Path) -> str | None:
    """Why the GGUF file tokenwire writes from ``folder`` (for OpenVINO, engine/openvino/convert.py) would not mean
    to llama.cpp what the folder means, or None: its Llama, Qwen2 and Qwen3 layers with a byte-level vocabulary do.
    Not Phi-3's or Gemma 3's (written for tokenwire's graph, with keys llama.cpp does not read), nor a sliding
    window (llama.cpp's Llama layers attend to the whole context: 14 apart in log-probability past the window),
    nor a SentencePiece vocabulary (written as bytes for OpenVINO GenAI: llama.cpp stops the process on it), nor
    LongRoPE."""
    import json

    from tokenwire.engine.openvino import convert, positions, vocab

    config = convert.text_config(json.loads((folder / "config.json").read_text()))
    arch = (config.get("architectures") or ["?"])[0]
    family = convert.FAMILIES.get(convert.LANGUAGE_MODELS.get(arch, arch))
    if family is None or family.fused or family.gemma:
        return f"its architecture {arch} is written for OpenVINO's graph, not in llama.cpp's own layout"
    if any(positions.layer_windows(config, int(config.get("num_hidden_layers") or 0))):
        return "it has a sliding attention window, which llama.cpp's Llama layers do not apply"
    if positions.rope_type(config) == "longrope":
        return "its LongRoPE is written for OpenVINO's graph"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    if vocab.is_sentencepiece(tokenizer.get("model") or {}):
        return "its SentencePiece vocabulary is written as bytes for OpenVINO GenAI, which llama.cpp does not read"
    return None


class LlamaCppBackend:
    """A GGUF model in one llama.cpp context, stepped by the engine loop's thread."""

    kind = "llamacpp"
    alive = True

    def __init__(self, config: LlamaCppEngineConfig) -> None:
        if config.scheduler.max_batch_size >= MAX_SEQUENCES:
            raise ValueError(f"--max-batch-size must be below {MAX_SEQUENCES} with the llamacpp engine")
        self.config = config
        self._resolved = models.resolve(config.model)
        check_folder(self._resolved)  # a folder it cannot serve is refused now, not at load
        self.name = self._resolved.name
        self.prefix = config.scheduler.prefix_caching
        self.scheduler = self._scheduler(config.scheduler)  # again in load(), with the context window
        self.llama: LlamaContext | None = None
        self.ids = SequenceIds(0)
        self.kept = KeptSequences()  # paused and ended requests' cells, by request id
        self.seq_of: dict[str, int] = {}  # the llama.cpp sequence of each request in the batch
        self.sampling = RequestSampling()  # generators and schema matchers (grammars once loaded)

    def _scheduler(self, config: SchedulerConfig) -> Scheduler:
        # the pool only counts cells: prefixes are matched here (``_reuse``), against the cells llama.cpp holds
        return Scheduler(replace(config, prefix_caching=False), self._make_room, self._reuse if self.prefix else None)

    def load(self) -> LoadedModel:
        from tokenwire.engine.openvino.model import Plan, prepare

        cfg = self.config
        gguf = gguf_of(self._resolved, "none" if cfg.quantize == "none" else "int8")
        # tokenizer, end ids, context: from the file (cached), or from a folder written in llama.cpp's own layout
        folder = Path(self._resolved.path)
        source = folder if self._resolved.gguf_file is None and layout.architecture(folder) else gguf
        prepared = prepare(Plan(source), cfg.max_model_len)
        threads = cfg.threads or os.cpu_count() or 1
        limits = cfg.scheduler
        # sequences: the batch's, and as many kept (paused, or ended with a prefix to share); llama.cpp reserves an
        # output row for each, so the batch holds at least that many tokens
        n_seq = min(MAX_SEQUENCES, 2 * limits.max_batch_size + 16)
        n_batch = max(limits.max_prefill_tokens + limits.max_batch_size, n_seq)
        llama = LlamaContext(
            gguf,
            limits.kv_cache_tokens,
            n_batch,
            n_seq,
            threads,
            kv_bytes=KV_BYTES,
            min_ctx=prepared.max_context,
            flash_attention=cfg.flash_attention,
        )
        self.llama, self.ids = llama, SequenceIds(llama.n_seq)
        log.info(
            "loaded %s with llama.cpp: %d threads, a KV cache of %d tokens (%.0f MiB)",
            gguf.name,
            threads,
            llama.n_ctx,
            llama.n_ctx * llama.kv_bytes_per_token / (1 << 20),
        )
        max_context = min(prepared.max_context, llama.context_trained or prepared.max_context, llama.n_ctx)
        self.scheduler = self._scheduler(replace(limits, kv_cache_tokens=llama.n_ctx, max_context=max_context))
        self.sampling.grammars = Grammars(prepared.tokenizer, llama.n_vocab, compact=cfg.json_whitespace == "compact")
        log.info("model ready: %s, context %d tokens (llama.cpp)", self.name, max_context)
        return LoadedModel(prepared.tokenizer, frozenset(prepared.eos_ids | llama.end_ids()), max_context)

    # -- requests
    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        seq = Sequence(request_id, prompt_ids, max_new_tokens, params, generated_before=continued)
        kept = self.kept.take(request_id)
        if kept is not None:
            n = min(common_prefix(kept.tokens, prompt_ids), len(prompt_ids) - 1)
            if kept.paused and n > 0:  # it goes on from its cells; its block table is adopted
                assert self.llama is not None
                self.llama.trim(kept.seq, n)
                self.seq_of[request_id] = kept.seq
                seq.num_computed = n
            else:
                self._forget(request_id, kept)
        self.scheduler.add(seq)
        self.sampling.add(request_id, params, prompt_ids[len(prompt_ids) - continued :])  # a paused one: its own

    def park(self, request_id: str) -> None:
        """Out of the batch: its cells are kept (nothing is copied) while room allows, and its generator and
        grammar state too."""
        seq = self.scheduler.get(request_id)
        if seq is None:
            return
        self._leave(seq, keep=True, paused=True)
        self.sampling.park(request_id)

    def forgive(self, request_id: str) -> None:
        pass  # the model runs in this process: no restarts to count

    def remove(self, request_id: str) -> None:
        kept = self.kept.take(request_id)
        if kept is not None:  # paused, now gone for good
            self._forget(request_id, kept)
        seq = self.scheduler.get(request_id)
        if seq is not None:
            self._leave(seq, keep=self.prefix, paused=False)  # its cells may serve the next prompt like it
        self.sampling.remove(request_id)

    def _leave(self, seq: Sequence, keep: bool, paused: bool) -> None:
        """Take ``seq`` out of the batch; with ``keep``, its computed cells stay (kept.py), its blocks held."""
        rid = seq.request_id
        computed = seq.length - 1 if seq.state is SeqState.DECODE else seq.num_computed
        sid = self.seq_of.pop(rid, None)
        if keep and sid is not None and computed > 0 and rid in self.scheduler.blocks:
            assert self.llama is not None
            self.llama.trim(sid, computed)
            self.scheduler.remove(seq, keep_blocks=True)
            self.kept.put(rid, Kept(sid, (seq.prompt_ids + seq.output_ids)[:computed], paused))
            return
        self.scheduler.remove(seq)
        if sid is not None:
            self._free(sid)

    def _forget(self, key: str, kept: Kept) -> None:
        self._free(kept.seq)
        if key in self.scheduler.blocks:
            self.scheduler.blocks.free(key)

    def _free(self, sid: int) -> None:
        if self.llama is not None:
            self.llama.trim(sid, 0)
        self.ids.give_back(sid)

    def _make_room(self, need: int) -> None:
        """Kept cells give way to sequences being admitted (the scheduler asks for ``need`` blocks available):
        the oldest first."""
        blocks = self.scheduler.blocks
        while blocks.num_available_blocks < need and (key := self.kept.oldest()) is not None:
            kept = self.kept.take(key)
            assert kept is not None
            self._forget(key, kept)

    def _sequence(self, request_id: str) -> int:
        """The request's llama.cpp sequence, taken now if it has none (the oldest kept one gives way if none is
        free)."""
        sid = self.seq_of.get(request_id)
        if sid is None:
            if not self.ids.available and (key := self.kept.oldest()) is not None:
                kept = self.kept.take(key)
                assert kept is not None
                self._forget(key, kept)
            sid = self.seq_of[request_id] = self.ids.take()
        return sid

    def _reuse(self, seq: Sequence) -> int:
        """At its first chunk: copy into ``seq``'s sequence the longest prefix of its prompt that a kept or running
        sequence holds (at least one prompt token is left to compute, for its logits); how many tokens."""
        assert self.llama is not None
        target = self._sequence(seq.request_id)
        running = []
        for other in self.scheduler.running:
            sid = self.seq_of.get(other.request_id)
            if other is seq or sid is None:
                continue
            computed = other.length - 1 if other.state is SeqState.DECODE else other.num_computed
            if computed > 0:
                running.append((sid, (other.prompt_ids + other.output_ids)[:computed]))
        donor, n = self.kept.best_donor(seq.prompt_ids, running)
        n = min(n, len(seq.prompt_ids) - 1)
        if n <= 0:
            return 0
        self.llama.copy(donor, target, n)
        return n

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def close(self) -> None:
        if self.llama is not None:
            self.llama.close()
            self.llama = None

    def idle(self) -> None:
        pass  # llama.cpp's KV cache is allocated whole; kept cells stay for the next turn

    def stats(self) -> EngineStats:
        s = self.scheduler
        block = s.blocks.block_tokens
        capacity = s.blocks.num_blocks * block
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            max_batch_size=self.config.scheduler.max_batch_size,
            kv_cache_tokens_used=s.blocks_in_batch() * block,
            kv_cache_tokens_capacity=capacity,
            kv_cache_tokens_paused=self.kept.paused_tokens,
            kv_cache_tokens_budget=capacity,  # allocated whole at start
        )

    # -- the step
    def step(self) -> StepOutput:
        assert self.llama is not None
        sched = self.scheduler
        out = StepOutput()
        self.sampling.fail_refused(sched.get, out, self._drop)
        plan = sched.schedule()
        out.scheduled = [s.request_id for s in plan.admitted]
        for seq in plan.matched:
            if seq.cached_tokens:
                out.cached[seq.request_id] = seq.cached_tokens
        decoding = sched.running[: plan.num_decode]
        chunks = [c for c in plan.prefill if c.seq.state is SeqState.PREFILL]
        entries = [Entry(s.output_ids[-1], s.length - 1, self._sequence(s.request_id), True) for s in decoding]
        for c in chunks:
            sid = self._sequence(c.seq.request_id)
            last = c.end - 1 if c.is_last else -1
            entries += [Entry(c.seq.prompt_ids[p], p, sid, p == last) for p in range(c.start, c.end)]
        if not entries:
            return out
        try:
            logits = self.llama.decode(entries)
        except DecodeError as exc:  # the batch failed as a whole: its requests fail, the others (queued) go on
            log.error("a llama.cpp batch of %d tokens failed: %s", len(entries), exc)
            for seq in [*decoding, *(c.seq for c in chunks)]:
                out.failed[seq.request_id] = EngineError(EngineErrorCode.GENERATION_FAILED, f"generation failed: {exc}")
                out.tokens.pop(seq.request_id, None)
                self._drop(seq)
            return out
        done = []
        for c in chunks:
            c.seq.num_computed = c.end
            if c.is_last:
                sched.promote(c.seq)
                done.append(c.seq)
        self.sampling.sample([*decoding, *done], torch.from_numpy(logits), out, self._drop)
        return out

    def _drop(self, seq: Sequence) -> None:
        """A failed request leaves at once; its cells are not kept (they may be half written)."""
        self._leave(seq, keep=False, paused=False)
        self.sampling.remove(seq.request_id)
