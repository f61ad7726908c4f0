"""GGUF files of an architecture OpenVINO GenAI does not build, written again as one it builds, once.

OpenVINO GenAI builds a model from a GGUF file of the ``llama``, ``qwen2`` or ``qwen3`` architecture only. A Gemma 3
file, as llama.cpp's converter writes it (architecture ``gemma3``, the SentencePiece vocabulary), holds Qwen3's
layers (query and key norms) plus what engine/openvino/ir.py builds into the graph from the keys tokenwire's own
converter writes (engine/openvino/convert.py, ``GEMMA``): its tensors already have those names, and its norms are
already stored as 1 + weight. So the file is copied with its tensors as they are (quantized blocks included: ir.py
takes each weight from them exactly), its keys renamed to ``qwen3``, the keys llama.cpp leaves to its own code
added (the embedding scale, the MLP's GELU, the attention scale, the local layers' rotary base and which layers are
local, linear rope scaling as ``rope_freqs``), and the vocabulary written as a byte-level one (what GenAI reads),
from the tokenizer tokenwire reads from the file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REWRITTEN = {"gemma3": "qwen3"}  # architecture -> the one GenAI builds that it is written as
GEMMA3_PATTERN = 6  # llama.cpp's default: five local layers, then a global one


def rewrite(src: Path, dst: Path, reader: Any, tokenizer: Any) -> None:
    """``src`` (open in ``reader``, a ``GGUFReader``; its architecture one of :data:`REWRITTEN`) written to ``dst``
    as the architecture GenAI builds; ``tokenizer``: the transformers tokenizer read from ``src``."""
    import gguf as gg
    import numpy as np
    from tqdm import tqdm

    from tokenwire.engine.openvino.convert import GEMMA_ACTIVATION, _write_tokenizer
    from tokenwire.engine.openvino.ir import copy_metadata

    own = reader.fields["general.architecture"].contents()
    arch = REWRITTEN[own]

    def value(key: str, default: Any = None) -> Any:
        found = reader.fields.get(f"{own}.{key}")
        return default if found is None else found.contents()

    kept = {name: f for name, f in reader.fields.items() if not name.startswith("tokenizer.")}
    file_type = reader.fields.get("general.file_type")
    writer = copy_metadata(_Fields(reader, kept), dst, int(file_type.contents()) if file_type else 1, arch)
    layers, embd, heads = int(value("block_count")), int(value("embedding_length")), int(value("attention.head_count"))
    head_size = int(value("attention.key_length", embd // heads))
    if value("rope.dimension_count") is None:  # whole heads rotate (what llama.cpp assumes without it)
        writer.add_rope_dimension_count(head_size)
    writer.add_embedding_scale(math.sqrt(embd))  # llama.cpp's gemma3 scales the embedding by sqrt(n_embd)
    writer.add_string(GEMMA_ACTIVATION, "gelu_tanh")
    # llama.cpp's rule: 1/sqrt(head size), but for the 27B (62 layers), whose query_pre_attn_scalar is n_embd/n_head
    writer.add_attention_scale(1.0 / math.sqrt(embd / heads if layers == 62 else head_size))
    if value("attention.sliding_window"):
        if value("rope.freq_base_swa") is None:
            writer.add_rope_freq_base_swa(10000.0)  # llama.cpp's default for gemma3's local layers
        if value("attention.sliding_window_pattern") is None:
            writer.add_sliding_window_pattern([i % GEMMA3_PATTERN < GEMMA3_PATTERN - 1 for i in range(layers)])
    _write_tokenizer(writer, tokenizer)
    scaling = str(value("rope.scaling.type", "none"))
    if scaling == "linear" and float(value("rope.scaling.factor", 1.0)) != 1.0:  # the global layers' (llama.cpp)
        writer.add_tensor("rope_freqs.weight", np.full(head_size // 2, float(value("rope.scaling.factor")), np.float32))
    elif scaling not in ("none", "linear"):
        raise ValueError(f"its rope scaling {scaling} is not one the OpenVINO route writes")
    for t in tqdm(reader.tensors, desc=f"writing {own} as {arch}", unit="tensor"):
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
        if t.tensor_type in (gg.GGMLQuantizationType.F32, gg.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:  # its blocks as they are
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # shaped in bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("%s written as %s for OpenVINO GenAI (%d layers)", src.name, arch, layers)


class _Fields:
    """``reader`` with only the ``fields`` given (what :func:`~tokenwire.engine.openvino.ir.copy_metadata` reads)."""

    def __init__(self, reader: Any, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.tensors = reader.tensors
