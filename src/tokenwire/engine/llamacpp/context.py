"""llama.cpp's model and context through llama-cpp-python's low-level API (ctypes): load a GGUF file, decode one
batch of tokens from many sequences, read their logits, and trim or copy a sequence's KV cells.

One context holds every sequence: its KV cache is *unified* (one buffer of ``n_ctx`` cells for all sequences,
where a cell may belong to several: a copied prefix costs no memory), and each request is a llama.cpp sequence id.
Everything here runs in the engine's model thread.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


class DecodeError(RuntimeError):
    """``llama_decode`` refused or failed a batch (its return code says why)."""


@dataclass(slots=True, frozen=True)
class Entry:
    """One token of a batch: which sequence, at which position, and whether its logits are wanted."""

    token: int
    pos: int
    seq: int
    logits: bool


def _library() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # the extra is not installed, or its library does not load on this CPU
        raise RuntimeError(
            f"the llamacpp engine needs llama-cpp-python: pip install 'tokenwire[llamacpp]' ({exc})"
        ) from exc
    return llama_cpp


class LlamaContext:
    """A GGUF model and one context over it, for ``n_seq`` sequences sharing its KV cells: ``n_ctx`` of them, or
    as many as ``kv_bytes`` hold if fewer (llama.cpp allocates them whole, float16), but never fewer than
    ``min_ctx`` (one whole context). ``flash_attention``: llama.cpp's flash attention (-1 its choice, 0 off, 1 on);
    on a CPU it sums in float16, so results turn a little on where a sequence's cells lie in the cache."""

    def __init__(
        self,
        path: Path,
        n_ctx: int,
        n_batch: int,
        n_seq: int,
        threads: int,
        kv_bytes: int = 1 << 62,
        min_ctx: int = 0,
        flash_attention: int = -1,
    ) -> None:
        lib = self.lib = _library()
        lib.llama_backend_init()
        _quiet(lib)
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ValueError(f"llama.cpp cannot read {path} (not a GGUF file it knows, or an architecture it lacks)")
        self.kv_bytes_per_token = self._kv_bytes_per_token()
        n_ctx = max(min(n_ctx, kv_bytes // self.kv_bytes_per_token) // 256, -(-min_ctx // 256), 1) * 256
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = min(n_seq, MAX_SEQUENCES)
        cparams.kv_unified = True  # one KV buffer for all sequences: prefixes copied between them are shared
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        cparams.flash_attn_type = flash_attention  # -1 llama.cpp's choice, 0 off (sums in float32), 1 on
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} tokens for {path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.n_batch = n_batch
        self.n_seq = int(cparams.n_seq_max)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)

    def _kv_bytes_per_token(self) -> int:
        """A token's KV cells in float16: a key and a value per layer and KV head (heads of n_embd / n_head; a
        model with wider heads needs more, which llama.cpp then allocates)."""
        lib, m = self.lib, self.model
        layers, heads, kv_heads = lib.llama_model_n_layer(m), lib.llama_model_n_head(m), lib.llama_model_n_head_kv(m)
        head_size = lib.llama_model_n_embd(m) // max(1, heads)
        return max(1, int(2 * layers * kv_heads * head_size * 2))

    @property
    def context_trained(self) -> int:
        return int(self.lib.llama_model_n_ctx_train(self.model))

    def end_ids(self) -> set[int]:
        """Every token the file marks as ending generation (end of sequence, end of turn, ...)."""
        is_eog = self.lib.llama_vocab_is_eog
        return {t for t in range(self.n_vocab) if is_eog(self.vocab, t)}

    def decode(self, entries: list[Entry]) -> np.ndarray:
        """Run ``entries`` (at most ``n_batch``) in one ``llama_decode``; the logits of the entries that asked for
        them, in order, as a float32 array [k, n_vocab]. DecodeError if llama.cpp refuses the batch."""
        if len(entries) > self.n_batch:
            raise ValueError(f"a batch of {len(entries)} tokens is more than n_batch {self.n_batch}")
        b = self.batch
        for i, e in enumerate(entries):
            b.token[i] = e.token
            b.pos[i] = e.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = e.seq
            b.logits[i] = e.logits
        b.n_tokens = len(entries)
        code = int(self.lib.llama_decode(self.ctx, b))
        if code != 0:
            why = {1: "no room in the KV cache for the batch", 2: "aborted", -1: "an invalid batch"}
            raise DecodeError(f"llama_decode returned {code} ({why.get(code, 'failed')})")
        wanted = [i for i, e in enumerate(entries) if e.logits]
        out = np.empty((len(wanted), self.n_vocab), dtype=np.float32)
        for row, i in enumerate(wanted):
            pointer = self.lib.llama_get_logits_ith(self.ctx, i)
            out[row] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return out

    def trim(self, seq: int, start: int) -> None:
        """Forget ``seq``'s cells from position ``start`` on (0: all of them)."""
        self.lib.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source: int, target: int, end: int) -> None:
        """Give ``target`` ``source``'s cells at positions ``0..end-1`` (shared, not duplicated)."""
        self.lib.llama_memory_seq_cp(self.memory, source, target, 0, end)

    def close(self) -> None:
        lib = self.lib
        if self.ctx:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None


_LOG_CALLBACK: Any = None  # kept alive: llama.cpp calls it from C


def _quiet(lib: Any) -> None:
    """llama.cpp's own log lines (every tensor it loads) go to this module's debug log, its errors to warnings."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", line)  # 4: GGML_LOG_LEVEL_ERROR

    _LOG_CALLBACK = lib.llama_log_callback(forward)
    lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
