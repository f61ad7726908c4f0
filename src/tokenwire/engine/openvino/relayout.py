"""GGUF files of an architecture OpenVINO GenAI does not build, written again as one it builds, once.

OpenVINO GenAI builds a model from a GGUF file of the ``llama``, ``qwen2`` or ``qwen3`` architecture only. Two more
are written again as one of those, their tensors' blocks as they are (quantized ones included: ir.py then takes
each weight from them exactly), their vocabulary as a byte-level one (what GenAI reads) from the tokenizer tokenwire
reads from the file:

- **gemma3** (llama.cpp's converter: SentencePiece vocabulary) holds Qwen3's layers (query and key norms) plus what
  engine/openvino/ir.py builds into the graph from the keys tokenwire's own converter writes
  (engine/openvino/convert.py, ``GEMMA``): its tensors already have those names and its norms are already stored as
  1 + weight, so the keys are renamed to ``qwen3`` and those llama.cpp leaves to its own code added (the embedding
  scale, the MLP's GELU, the attention scale, the local layers' rotary base and which layers are local, linear rope
  scaling as ``rope_freqs``).
- **phi3** (Phi-3, Phi-3.5, Phi-4) holds Llama's layers with the query, key and value in one matrix and the gate and
  up in another, and its heads rotated in halves (NeoX's order): each fused matrix is cut into Llama's by rows (a
  quantized row is whole blocks, so the cut keeps them), the query and key rows put in llama.cpp's Llama order, the
  sliding window kept as it is (every layer's); LongRoPE (the 128k models) as tokenwire's converter writes it: the
  short factors as ``rope_freqs``, the attention factor as ``attention.scale``, the context its original one (past
  it LongRoPE switches to its long factors, which one graph cannot do). Rotary embeddings on part of each head
  (Phi-4-mini) are refused (:func:`refusal`), as they are for a folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REWRITTEN = {"gemma3": "qwen3", "phi3": "llama"}  # architecture -> the one GenAI builds that it is written as
GEMMA3_PATTERN = 6  # llama.cpp's default: five local layers, then a global one


def refusal(header: dict[str, Any]) -> str | None:
    """Why a file of a :data:`REWRITTEN` architecture (``header``: :func:`~tokenwire.engine.models.gguf_header`)
    cannot be written for OpenVINO, or None."""
    own = header.get("general.architecture")
    if own == "phi3":
        embd, heads = header.get("phi3.embedding_length"), header.get("phi3.attention.head_count")
        dims = header.get("phi3.rope.dimension_count")
        if isinstance(embd, int) and isinstance(heads, int) and isinstance(dims, int) and dims * heads != embd:
            return f"its rotary embeddings cover {dims} of each head's {embd // heads} dimensions (Phi-4-mini's kind)"
    return None


def served_context(header: dict[str, Any]) -> int | None:
    """The context the route serves a file of a :data:`REWRITTEN` architecture at where shorter than the file's:
    a LongRoPE Phi-3's original context (llama.cpp's converter writes the attention factor only with the long and
    short factors)."""
    original = header.get("phi3.rope.scaling.original_context_length")
    if header.get("general.architecture") == "phi3" and "phi3.rope.scaling.attn_factor" in header:
        return int(original) if isinstance(original, int) else None
    return None


def rewrite(src: Path, dst: Path, reader: Any, tokenizer: Any) -> None:
    """``src`` (open in ``reader``, a ``GGUFReader``; its architecture one of :data:`REWRITTEN`) written to ``dst``
    as the architecture GenAI builds; ``tokenizer``: the transformers tokenizer read from ``src``."""
    from tqdm import tqdm

    from tokenwire.engine.openvino.ir import copy_metadata
    from tokenwire.engine.openvino.vocab import write_tokenizer

    own = reader.fields["general.architecture"].contents()
    arch = REWRITTEN[own]
    shape = _Shape(reader, own)
    replaced = {f"{own}.context_length"} if own == "phi3" and shape.longrope else set()
    kept = {n: f for n, f in reader.fields.items() if not n.startswith("tokenizer.") and n not in replaced}
    file_type = reader.fields.get("general.file_type")
    writer = copy_metadata(_Fields(reader, kept), dst, int(file_type.contents()) if file_type else 1, arch)
    if shape.value("rope.dimension_count") is None:  # whole heads rotate (what llama.cpp assumes without it)
        writer.add_rope_dimension_count(shape.head_size)
    tensors = (_gemma3 if own == "gemma3" else _phi3)(writer, shape)
    write_tokenizer(writer, tokenizer)
    for name, data, raw in tqdm(tensors(reader.tensors), desc=f"writing {own} as {arch}", unit="tensor"):
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("%s written as %s for OpenVINO GenAI (%d layers)", src.name, arch, shape.layers)


Tensors = Callable[[Any], Iterator[tuple[str, Any, Any]]]  # the file's tensors -> (name, data, raw type or None)


class _Shape:
    """The model's sizes, read from the file's keys."""

    def __init__(self, reader: Any, own: str) -> None:
        self.reader, self.own = reader, own
        self.layers, self.embd = int(self.value("block_count")), int(self.value("embedding_length"))
        self.heads = int(self.value("attention.head_count"))
        self.kv_heads = int(self.value("attention.head_count_kv", self.heads))
        self.head_size = int(self.value("attention.key_length", self.embd // self.heads))
        self.longrope = any(t.name == "rope_factors_short.weight" for t in reader.tensors)

    def value(self, key: str, default: Any = None) -> Any:
        found = self.reader.fields.get(f"{self.own}.{key}")
        return default if found is None else found.contents()


def _as_they_are(tensor: Any) -> tuple[str, Any, Any]:
    """A tensor to write unchanged: float ones shaped, quantized ones as their blocks."""
    import gguf as gg
    import numpy as np

    shape = tuple(int(x) for x in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    if tensor.tensor_type in (gg.GGMLQuantizationType.F32, gg.GGMLQuantizationType.F16):
        return tensor.name, np.asarray(tensor.data).reshape(shape), None
    return tensor.name, np.asarray(tensor.data), tensor.tensor_type  # rows of blocks, shaped in bytes


def _gemma3(writer: Any, shape: _Shape) -> Tensors:
    """Gemma 3's keys beside Qwen3's (engine/openvino/convert.py, ``GEMMA``); its tensors as they are."""
    import numpy as np

    from tokenwire.engine.openvino.convert import GEMMA_ACTIVATION

    writer.add_embedding_scale(math.sqrt(shape.embd))  # llama.cpp's gemma3 scales the embedding by sqrt(n_embd)
    writer.add_string(GEMMA_ACTIVATION, "gelu_tanh")
    # llama.cpp's rule: 1/sqrt(head size), but for the 27B (62 layers), whose query_pre_attn_scalar is n_embd/n_head
    writer.add_attention_scale(1.0 / math.sqrt(shape.embd / shape.heads if shape.layers == 62 else shape.head_size))
    if shape.value("attention.sliding_window"):
        if shape.value("rope.freq_base_swa") is None:
            writer.add_rope_freq_base_swa(10000.0)  # llama.cpp's default for gemma3's local layers
        if shape.value("attention.sliding_window_pattern") is None:
            writer.add_sliding_window_pattern([i % GEMMA3_PATTERN < GEMMA3_PATTERN - 1 for i in range(shape.layers)])
    scaling = str(shape.value("rope.scaling.type", "none"))
    factor = float(shape.value("rope.scaling.factor", 1.0))
    if scaling == "linear" and factor != 1.0:  # the global layers' (llama.cpp)
        writer.add_tensor("rope_freqs.weight", np.full(shape.head_size // 2, factor, np.float32))
    elif scaling not in ("none", "linear"):
        raise ValueError(f"its rope scaling {scaling} is not one the OpenVINO route writes")

    def tensors(found: Any) -> Iterator[tuple[str, Any, Any]]:
        return (_as_they_are(t) for t in found)

    return tensors


def _phi3(writer: Any, shape: _Shape) -> Tensors:
    """Phi-3's fused matrices cut into Llama's, its query and key rows in llama.cpp's Llama order; LongRoPE as
    tokenwire's converter writes it for a folder (engine/openvino/convert.py)."""
    q_rows, kv_rows = shape.heads * shape.head_size, shape.kv_heads * shape.head_size
    if shape.longrope:
        original = int(shape.value("rope.scaling.original_context_length"))
        writer.add_context_length(original)  # past it LongRoPE's long factors, which one graph cannot switch to
        factor = float(shape.value("rope.scaling.attn_factor", 1.0))  # it scales cos and sin: the scores by its square
        writer.add_attention_scale(factor**2 / math.sqrt(shape.head_size))

    def tensors(found: Any) -> Iterator[tuple[str, Any, Any]]:
        for t in found:
            name, data, raw = _as_they_are(t)
            if name.endswith(".attn_qkv.weight"):
                layer = name.removesuffix(".attn_qkv.weight")
                yield f"{layer}.attn_q.weight", _llama_order(data[:q_rows], shape.heads), raw
                yield f"{layer}.attn_k.weight", _llama_order(data[q_rows : q_rows + kv_rows], shape.kv_heads), raw
                yield f"{layer}.attn_v.weight", data[q_rows + kv_rows :], raw
            elif name.endswith((".attn_q.weight", ".attn_k.weight")):  # a file with them apart: only reordered
                yield name, _llama_order(data, shape.heads if ".attn_q." in name else shape.kv_heads), raw
            elif name.endswith(".ffn_up.weight"):  # gate first, then up (as transformers' chunk(2) reads it)
                half = data.shape[0] // 2
                yield name.replace(".ffn_up.", ".ffn_gate."), data[:half], raw
                yield name, data[half:], raw
            elif name == "rope_factors_short.weight":  # each rotary frequency's divisor below the original context
                yield "rope_freqs.weight", data, raw
            elif name != "rope_factors_long.weight":
                yield name, data, raw

    return tensors


def _llama_order(rows: Any, heads: int) -> Any:
    """Rows of a query or key matrix (float, or quantized blocks: whole rows move) from NeoX's order (each head's
    rotated halves apart) to the one llama.cpp writes for Llama (interleaved), as its converter permutes them."""
    import numpy as np

    half = rows.shape[0] // heads // 2
    return np.ascontiguousarray(rows.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(rows.shape))


class _Fields:
    """``reader`` with only the ``fields`` given (what :func:`~tokenwire.engine.openvino.ir.copy_metadata` reads)."""

    def __init__(self, reader: Any, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.tensors = reader.tensors
