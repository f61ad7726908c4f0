"""A Hugging Face model folder written as a float16 GGUF file, once, so that OpenVINO GenAI can build its graph.

OpenVINO GenAI builds a model from a GGUF file (engine/openvino/ir.py makes that IR and quantizes it); its own
route from a Hugging Face folder (``optimum-cli export openvino``) needs optimum-intel, whose releases pin
transformers and torch below tokenwire's. So tokenwire writes the GGUF file itself, as llama.cpp's converter does,
with the ``gguf`` package it already depends on, weights in float16:

- the families of :data:`FAMILIES`: Llama (SmolLM2, TinyLlama, ...; Mistral, whose layers are Llama's), Qwen2/2.5
  (biases on the query, key and value), Qwen3 (query and key norms) and Phi-3 (its fused query-key-value and
  gate-up matrices split into Llama's);
- a sliding attention window (Mistral v0.1, Phi-3, Qwen2's with ``use_sliding_window``) as llama.cpp's keys
  (``attention.sliding_window`` and, per layer, ``attention.sliding_window_pattern``), which ir.py builds into the
  masks of those layers (OpenVINO GenAI's reader has no window of its own);
- a byte-level BPE tokenizer, or a SentencePiece BPE one with byte fallback, written as byte-level (vocab.py);
- rope scaling (Llama 3's, or linear; under ``rope_scaling`` or transformers 5's ``rope_parameters``: positions.py)
  as llama.cpp writes it, a ``rope_freqs`` tensor of divisors, which ir.py applies to the graph's rotary frequencies
  (OpenVINO GenAI's reader ignores it); Phi-3's LongRoPE as its short factors, with its attention factor as llama.cpp's
  ``attention.scale`` (what attention scores are scaled by, which ir.py gives each attention), served up to its
  original context (:func:`served_context`: past it LongRoPE switches to its long factors, which a graph built
  once cannot do).

The file is kept in the cache directory under the SHA-256 of the folder's content (config, tokenizer, weights),
with a ``.json`` marker written after it: a file without its marker or of another size than the marker says is a
partial or corrupt conversion and is made again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.openvino.positions import (
    layer_windows,
    local_rope_settings,
    rope_scaling,
    rope_settings,
    rope_type,
)
from tokenwire.engine.openvino.vocab import is_sentencepiece, write_tokenizer

log = logging.getLogger(__name__)

CONVERTER_VERSION = 3  # 2: rope scaling written as rope_freqs; SentencePiece vocabularies as bytes. 3: windows


@dataclass(slots=True, frozen=True)
class Family:
    """How one architecture is written: its GGUF name and what its layers hold beyond Llama's."""

    gguf: str
    permute_qk: bool = True  # llama.cpp's row order for Llama's rotary halves; NeoX-style families keep theirs
    qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections
    qk_norm: bool = False  # Qwen3: an RMS norm on each head's query and key
    fused: bool = False  # Phi-3: one matrix for query, key and value (qkv_proj), one for gate and up (gate_up_proj)
    gemma: bool = False  # Gemma 3: norms of 1 + weight, norms after each block, GELU, a scaled embedding (see GEMMA)


FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("llama"),  # Llama's layers (as llama.cpp writes it) and a sliding window
    "Qwen2ForCausalLM": Family("qwen2", permute_qk=False, qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", permute_qk=False, qk_norm=True),
    "Phi3ForCausalLM": Family("llama", fused=True),  # Llama's layers once its fused matrices are split
    "Gemma3ForCausalLM": Family("qwen3", permute_qk=False, qk_norm=True, gemma=True),  # Qwen3's and GEMMA's
}
GEMMA_ACTIVATION = "tokenwire.feed_forward_activation"  # "gelu_tanh": the MLP's activation, where not SiLU
"""Gemma 3 is written as Qwen3's layers (query and key norms) plus what ir.py adds to the graph from the file:
each norm's weight stored as 1 + weight (what llama.cpp's converter writes: Gemma's norms multiply by 1 + weight),
the norms after attention and after the MLP as llama.cpp's ``post_attention_norm`` and ``post_ffw_norm`` tensors,
the embedding's scale (square root of the hidden size) as ``embedding_scale``, the MLP's tanh GELU as
:data:`GEMMA_ACTIVATION`, the local layers' rotary base as ``rope.freq_base_swa``, the attention's scale
(``query_pre_attn_scalar``) as ``attention.scale``, and a final logit soft cap as ``final_logit_softcapping``."""
LANGUAGE_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
"""Folders of a text-and-image model whose language model is one of :data:`FAMILIES` (Gemma 3 4B, 12B, 27B): its
``text_config`` and its ``language_model.`` weights are written, the image tower left out (tokenwire serves text)."""
ARCHITECTURES = {name: family.gguf for name, family in FAMILIES.items()} | {
    name: FAMILIES[text].gguf for name, text in LANGUAGE_MODELS.items()
}
ROPE_TYPES = ("default", "llama3", "linear", "longrope")  # written as rope_freqs (ir.py applies it)


def unsupported(folder: Path) -> str | None:
    """Why ``folder`` cannot be converted, or None if it can (cheap: reads config and tokenizer only)."""
    try:
        config = text_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        return f"its config.json cannot be read ({exc})"
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("attn_logit_softcapping"):  # Gemma 2
        return f"{arch} soft-caps its attention scores (attn_logit_softcapping): OpenVINO's paged attention cannot"
    if arch not in ARCHITECTURES:
        return f"its architecture {arch} is not one the GGUF converter writes ({', '.join(ARCHITECTURES)})"
    if float(rope_settings(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0) != 1.0:
        return "it rotates only part of each head (partial_rotary_factor), which the GGUF converter does not write"
    if rope_type(config) not in ROPE_TYPES:
        return f"its rope scaling ({rope_type(config)}) is not one the OpenVINO route writes ({', '.join(ROPE_TYPES)})"
    if arch == "Gemma3ForCausalLM" and (why := _gemma_unsupported(config)):
        return why
    if not list(folder.glob("*.safetensors")):
        return "it has no .safetensors weights"
    try:
        tok = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return "it has no readable tokenizer.json"
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not (
        "ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or is_sentencepiece(model)
    ):
        return "its tokenizer is neither a byte-level BPE one nor a SentencePiece BPE one with byte fallback"
    return None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: for :data:`LANGUAGE_MODELS`, its ``text_config`` with the defaults
    of its class filled in as transformers fills them (releases write only what differs: Gemma 3 4B's names 5
    settings), named as its text class; any other config as it is."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in LANGUAGE_MODELS:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict) or not isinstance(text.get("model_type"), str):
        raise ValueError(f"its config names {arch} but has no text_config with a model_type")
    from transformers import AutoConfig

    settings = {k: v for k, v in text.items() if k != "model_type"}
    filled = AutoConfig.for_model(text["model_type"], **settings).to_dict()
    return {**filled, **text, "architectures": [LANGUAGE_MODELS[arch]]}


def _gemma_unsupported(config: dict[str, Any]) -> str | None:
    if config.get("use_bidirectional_attention"):
        return "its attention is bidirectional (use_bidirectional_attention)"
    local = local_rope_settings(config)
    if str(local.get("rope_type") or local.get("type") or "default") != "default":
        return f"its local layers' rope scaling ({local.get('rope_type')}) is not one the OpenVINO route writes"
    return None


def content_key(folder: Path) -> str:
    """SHA-256 of what the conversion reads, and how it writes."""
    # "none": the format name it had when it also wrote quantized files, so earlier float16 conversions still match
    digest = hashlib.sha256(f"tokenwire-gguf|v{CONVERTER_VERSION}|none".encode())
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    names += sorted(p.name for p in folder.glob("*.safetensors"))
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        digest.update(name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def converted(folder: Path, matrices: str = "none") -> Path:
    """The GGUF file of ``folder`` (float16, or with ``matrices`` ``int8`` in Q8_0 for llama.cpp), written now if
    missing, partial or corrupt."""
    if matrices == "none":
        return cached_gguf(folder, "none", write_gguf, "float16, for OpenVINO")
    return cached_gguf(folder, "q8_0", functools.partial(write_gguf, matrices=matrices), "Q8_0 matrices, for llama.cpp")


def cached_gguf(folder: Path, form: str, write: Callable[[Path, Path], None], what: str) -> Path:
    """The GGUF file ``write`` makes of ``folder`` in the cache directory, named by the folder's content and
    ``form``, written now (``what`` it is, for the log) if missing, or partial or corrupt: a ``.json`` marker written
    after the file names its size."""
    target = models.cache_dir() / f"{folder.name}-{content_key(folder)}-{form}.gguf"
    marker = target.with_suffix(".json")
    try:
        if json.loads(marker.read_text()).get("size") == target.stat().st_size:
            return target
        log.warning("the converted model at %s is incomplete or corrupt; converting again", target)
    except (OSError, ValueError):
        pass
    marker.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to GGUF (%s) (one time; cached at %s)", folder, what, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        write(folder, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(json.dumps({"source": str(folder), "format": form, "size": target.stat().st_size}))
    return target


def _tensors(folder: Path, language_model: bool = False) -> dict[str, Any]:
    """Every weight as a float32 numpy array (bfloat16 files too: read through torch). ``language_model``: only a
    text-and-image model's language model (``language_model.model.*``, or ``model.language_model.*`` as some
    releases name it), named as its text class names them (``model.*``)."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                key = name
                if language_model:
                    if name.startswith("language_model."):
                        key = name.removeprefix("language_model.")
                    elif name.startswith("model.language_model."):
                        key = "model." + name.removeprefix("model.language_model.")
                    else:
                        continue  # the image tower and its projector
                out[key] = f.get_tensor(name).float().numpy()
    return out


def matrix_data(data: Any, form: str) -> tuple[Any, Any]:
    """A matrix as a GGUF file holds it, and its GGUF type where the array's own does not say it: ``none``, float16;
    ``int8``, llama.cpp's Q8_0 (blocks of 32 int8 with a float16 scale; a matrix whose rows are not whole blocks
    stays float16, as llama.cpp's converter leaves it)."""
    import gguf
    import numpy as np

    if form == "int8" and data.shape[-1] % 32 == 0:
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(np.ascontiguousarray(data, np.float32), q8_0), q8_0
    if form not in ("none", "int8"):
        raise ValueError(f"matrices are written as none (float16) or int8 (Q8_0), not {form!r}")
    return data.astype(np.float16), None


def write_gguf(folder: Path, target: Path, matrices: str = "none") -> None:
    """``folder`` as a GGUF file at ``target``, its matrices as :func:`matrix_data` writes ``matrices``: ``none``
    (float16, what OpenVINO reads) or ``int8`` (Q8_0, for llama.cpp)."""
    import gguf
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    whole = json.loads((folder / "config.json").read_text())
    config = text_config(whole)
    language_model = config is not whole  # a text-and-image folder: its language model's weights
    cfg = AutoConfig.from_pretrained(folder).get_text_config()
    tok = AutoTokenizer.from_pretrained(folder)
    family = FAMILIES[config["architectures"][0]]
    if family.gemma:  # what a release leaves out of its config (the 4B-27B text_config: most), as transformers fills it
        config = {**cfg.to_dict(), **config}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(target), family.gguf)
    w.add_name(folder.name)
    _add_keys(w, cfg, config, family, head_dim)
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if matrices == "int8" else gguf.LlamaFileType.MOSTLY_F16)
    write_tokenizer(w, tok)
    out = _Tensors(w, family, _tensors(folder, language_model=language_model), matrices)
    factors, attention_factor = rope_scaling(cfg, config, head_dim)
    if factors is not None:  # llama.cpp's rope_freqs: each rotary frequency's divisor
        w.add_tensor("rope_freqs.weight", factors)
    if attention_factor != 1.0:  # it scales cos and sin, so the query and the key: their product by its square
        w.add_attention_scale(attention_factor**2 / math.sqrt(head_dim))
    out.matrix("token_embd.weight", out.weights["model.embed_tokens.weight"])
    for i in tqdm(range(cfg.num_hidden_layers), desc="converting to GGUF", unit="layer"):
        out.layer(i, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
    out.norm("output_norm.weight", out.weights["model.norm.weight"])
    if not getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in out.weights:
        out.matrix("output.weight", out.weights["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_keys(w: Any, cfg: Any, config: dict[str, Any], family: Family, head_dim: int) -> None:
    """The model's shape, rotary base, windows and (Gemma) its own keys, as llama.cpp names them."""
    heads = cfg.num_attention_heads
    w.add_context_length(served_context(config))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope_settings(config)["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:  # Qwen3: heads wider than hidden / heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    windows = layer_windows(config, cfg.num_hidden_layers)
    if any(windows):  # llama.cpp's keys; ir.py builds the window into those layers' masks
        w.add_sliding_window(max(windows))
        w.add_sliding_window_pattern([bool(x) for x in windows])
    if family.gemma:
        _add_gemma_keys(w, cfg, config)


class _Tensors:
    """The folder's weights written as llama.cpp names them: matrices in float16 (or Q8_0: :func:`matrix_data`),
    norms in float32 (Gemma's as 1 + weight, what it multiplies by), a Llama's query and key rows in llama.cpp's
    order."""

    def __init__(self, w: Any, family: Family, weights: dict[str, Any], matrices: str = "none") -> None:
        self.w, self.family, self.weights, self.matrices = w, family, weights, matrices

    def matrix(self, name: str, data: Any) -> None:
        array, kind = matrix_data(data, self.matrices)
        self.w.add_tensor(name, array, raw_dtype=kind)

    def norm(self, name: str, data: Any) -> None:
        self.w.add_tensor(name, data + 1.0 if self.family.gemma else data)

    def rotary(self, data: Any, n: int) -> Any:
        """llama.cpp's row order for Q and K (Llama's rotary halves interleaved); NeoX-style families keep theirs."""
        if not self.family.permute_qk:
            return data
        return data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)

    def layer(self, i: int, heads: int, kv_heads: int, head_dim: int) -> None:
        weights, family, p = self.weights, self.family, f"model.layers.{i}."
        layer = _layer(weights, p, family, heads * head_dim, kv_heads * head_dim)
        self.norm(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"])
        self.matrix(f"blk.{i}.attn_q.weight", self.rotary(layer["q"], heads))
        self.matrix(f"blk.{i}.attn_k.weight", self.rotary(layer["k"], kv_heads))
        self.matrix(f"blk.{i}.attn_v.weight", layer["v"])
        if family.qkv_bias:
            self.w.add_tensor(f"blk.{i}.attn_q.bias", self.rotary(weights[p + "self_attn.q_proj.bias"], heads))
            self.w.add_tensor(f"blk.{i}.attn_k.bias", self.rotary(weights[p + "self_attn.k_proj.bias"], kv_heads))
            self.w.add_tensor(f"blk.{i}.attn_v.bias", weights[p + "self_attn.v_proj.bias"])
        if family.qk_norm:
            self.norm(f"blk.{i}.attn_q_norm.weight", weights[p + "self_attn.q_norm.weight"])
            self.norm(f"blk.{i}.attn_k_norm.weight", weights[p + "self_attn.k_norm.weight"])
        self.matrix(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        if family.gemma:  # a norm before the MLP, and one after each block
            self.norm(f"blk.{i}.ffn_norm.weight", weights[p + "pre_feedforward_layernorm.weight"])
            self.norm(f"blk.{i}.post_attention_norm.weight", weights[p + "post_attention_layernorm.weight"])
            self.norm(f"blk.{i}.post_ffw_norm.weight", weights[p + "post_feedforward_layernorm.weight"])
        else:
            self.norm(f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
        self.matrix(f"blk.{i}.ffn_gate.weight", layer["gate"])
        self.matrix(f"blk.{i}.ffn_up.weight", layer["up"])
        self.matrix(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])


def _add_gemma_keys(w: Any, cfg: Any, config: dict[str, Any]) -> None:
    """Gemma 3's keys beside Qwen3's (see :data:`GEMMA_ACTIVATION`)."""
    w.add_embedding_scale(math.sqrt(cfg.hidden_size))
    w.add_string(GEMMA_ACTIVATION, "gelu_tanh")
    w.add_rope_freq_base_swa(float(local_rope_settings(config)["rope_theta"]))
    w.add_attention_scale(float(cfg.query_pre_attn_scalar) ** -0.5)
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _layer(weights: dict[str, Any], p: str, family: Family, q_rows: int, kv_rows: int) -> dict[str, Any]:
    """A layer's query, key, value, gate and up matrices, split out of Phi-3's fused ones."""
    if not family.fused:
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
        names |= {"gate": "mlp.gate_proj", "up": "mlp.up_proj"}
        return {key: weights[f"{p}{name}.weight"] for key, name in names.items()}
    qkv, gate_up = weights[p + "self_attn.qkv_proj.weight"], weights[p + "mlp.gate_up_proj.weight"]
    half = gate_up.shape[0] // 2  # Phi-3's MLP: gate first, then up (chunk(2))
    return {
        "q": qkv[:q_rows],
        "k": qkv[q_rows : q_rows + kv_rows],
        "v": qkv[q_rows + kv_rows :],
        "gate": gate_up[:half],
        "up": gate_up[half:],
    }


def served_context(config: dict[str, Any]) -> int:
    """The context the OpenVINO route serves a config at: its ``max_position_embeddings``, or LongRoPE's original
    context where that is shorter (past it, LongRoPE switches to its long factors)."""
    config = text_config(config)
    context = int(config.get("max_position_embeddings") or 4096)
    if rope_type(config) == "longrope":
        settings = rope_settings(config)
        original = settings.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
        if original:
            context = min(context, int(original))
    return context
