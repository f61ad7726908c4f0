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
- a byte-level BPE tokenizer, or a SentencePiece BPE one with byte fallback, written as byte-level
  (:func:`_write_tokenizer`);
- rope scaling (Llama 3's, or linear; under ``rope_scaling`` or transformers 5's ``rope_parameters``) as llama.cpp
  writes it, a ``rope_freqs`` tensor of divisors, which ir.py applies to the graph's rotary frequencies (OpenVINO
  GenAI's reader ignores it); Phi-3's LongRoPE as its short factors, with its attention factor as llama.cpp's
  ``attention.scale`` (what attention scores are scaled by, which ir.py gives each attention), served up to its
  original context (:func:`served_context`: past it LongRoPE switches to its long factors, which a graph built
  once cannot do).

The file is kept in the cache directory under the SHA-256 of the folder's content (config, tokenizer, weights),
with a ``.json`` marker written after it: a file without its marker or of another size than the marker says is a
partial or corrupt conversion and is made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenwire.engine import models

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
    if model.get("type") != "BPE" or not ("ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or _sentencepiece(model)):
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
    if config.get("attn_logit_softcapping"):
        return "it soft-caps its attention scores (attn_logit_softcapping), which OpenVINO's paged attention cannot"
    if config.get("use_bidirectional_attention"):
        return "its attention is bidirectional (use_bidirectional_attention)"
    local = local_rope_settings(config)
    if str(local.get("rope_type") or local.get("type") or "default") != "default":
        return f"its local layers' rope scaling ({local.get('rope_type')}) is not one the OpenVINO route writes"
    return None


def _sentencepiece(model: dict[str, Any]) -> bool:
    """A tokenizer.json model converted from SentencePiece BPE (Llama 2, Mistral, TinyLlama): byte fallback."""
    return bool(model.get("byte_fallback"))


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


def converted(folder: Path) -> Path:
    """The float16 GGUF file of ``folder``, written now if missing, partial or corrupt."""
    target = models.cache_dir() / f"{folder.name}-{content_key(folder)}-none.gguf"
    marker = target.with_suffix(".json")
    try:
        if json.loads(marker.read_text()).get("size") == target.stat().st_size:
            return target
        log.warning("the converted model at %s is incomplete or corrupt; converting again", target)
    except (OSError, ValueError):
        pass
    marker.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to GGUF (float16) for OpenVINO (one time; cached at %s)", folder, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        write_gguf(folder, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(json.dumps({"source": str(folder), "format": "none", "size": target.stat().st_size}))
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


def write_gguf(folder: Path, target: Path) -> None:
    import gguf
    import numpy as np
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    whole = json.loads((folder / "config.json").read_text())
    config = text_config(whole)
    cfg = AutoConfig.from_pretrained(folder).get_text_config()
    tok = AutoTokenizer.from_pretrained(folder)
    weights = _tensors(folder, language_model=config is not whole)
    family = FAMILIES[config["architectures"][0]]
    if family.gemma:  # what a release leaves out of its config (the 4B-27B text_config: most), as transformers fills it
        config = {**cfg.to_dict(), **config}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(target), family.gguf)
    w.add_name(folder.name)
    w.add_context_length(served_context(config))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
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
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)  # OpenVINO reads it
    _write_tokenizer(w, tok)

    def matrix(name: str, data: Any) -> None:
        w.add_tensor(name, data.astype(np.float16))

    def norm(name: str, data: Any) -> None:  # float32; Gemma's as 1 + weight, what it multiplies by
        w.add_tensor(name, data + 1.0 if family.gemma else data)

    def rotary(data: Any, n: int) -> Any:  # llama.cpp's row order for Q and K (Llama's rotary halves)
        if not family.permute_qk:
            return data
        return data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)

    factors, attention_factor = rope_scaling(cfg, config, head_dim)
    if factors is not None:  # llama.cpp's rope_freqs: each rotary frequency's divisor
        w.add_tensor("rope_freqs.weight", factors)
    if attention_factor != 1.0:  # it scales cos and sin, so the query and the key: their product by its square
        w.add_attention_scale(attention_factor**2 / math.sqrt(head_dim))
    matrix("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in tqdm(range(cfg.num_hidden_layers), desc="converting to GGUF", unit="layer"):
        p = f"model.layers.{i}."
        layer = _layer(weights, p, family, heads * head_dim, kv_heads * head_dim)
        norm(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"])
        matrix(f"blk.{i}.attn_q.weight", rotary(layer["q"], heads))
        matrix(f"blk.{i}.attn_k.weight", rotary(layer["k"], kv_heads))
        matrix(f"blk.{i}.attn_v.weight", layer["v"])
        if family.qkv_bias:
            w.add_tensor(f"blk.{i}.attn_q.bias", rotary(weights[p + "self_attn.q_proj.bias"], heads))
            w.add_tensor(f"blk.{i}.attn_k.bias", rotary(weights[p + "self_attn.k_proj.bias"], kv_heads))
            w.add_tensor(f"blk.{i}.attn_v.bias", weights[p + "self_attn.v_proj.bias"])
        if family.qk_norm:
            norm(f"blk.{i}.attn_q_norm.weight", weights[p + "self_attn.q_norm.weight"])
            norm(f"blk.{i}.attn_k_norm.weight", weights[p + "self_attn.k_norm.weight"])
        matrix(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        if family.gemma:  # a norm before the MLP, and one after each block
            norm(f"blk.{i}.ffn_norm.weight", weights[p + "pre_feedforward_layernorm.weight"])
            norm(f"blk.{i}.post_attention_norm.weight", weights[p + "post_attention_layernorm.weight"])
            norm(f"blk.{i}.post_ffw_norm.weight", weights[p + "post_feedforward_layernorm.weight"])
        else:
            norm(f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
        matrix(f"blk.{i}.ffn_gate.weight", layer["gate"])
        matrix(f"blk.{i}.ffn_up.weight", layer["up"])
        matrix(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])
    norm("output_norm.weight", weights["model.norm.weight"])
    if not getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in weights:
        matrix("output.weight", weights["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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


def rope_scaling(cfg: Any, config: dict[str, Any], head_dim: int) -> tuple[Any, float]:
    """The rope scaling of a model as rotary-frequency divisors (None: plain RoPE) and the factor its cos and sin are
    scaled by (LongRoPE's attention factor; 1 otherwise). LongRoPE's frequencies are transformers' own
    (``cfg``: the loaded config), for sequences up to its original context (its short factors)."""
    import numpy as np

    if rope_type(config) != "longrope":
        return rope_factors(rope_settings(config), head_dim), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, None)
    base = float(cfg.rope_parameters["rope_theta"])
    plain = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (plain / inv_freq.double().numpy()).astype(np.float32), float(attention_factor)


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


def layer_windows(config: dict[str, Any], layers: int) -> list[int]:
    """Each layer's attention window (0: the whole context): :func:`sliding_window` for the layers ``layer_types``
    names ``sliding_attention`` (Qwen2 without it: those from ``max_window_layers`` on), or for every layer."""
    window = sliding_window(config)
    if window is None:
        return [0] * layers
    kinds = config.get("layer_types")
    if kinds:
        return [window if kind == "sliding_attention" else 0 for kind in kinds]
    if pattern := config.get("sliding_window_pattern"):  # Gemma 3 as transformers 4 saved it: every n-th is whole
        return [0 if (i + 1) % int(pattern) == 0 else window for i in range(layers)]
    first = int(config.get("max_window_layers") or 0) if "Qwen2ForCausalLM" in config.get("architectures", []) else 0
    return [window if i >= first else 0 for i in range(layers)]


def sliding_window(config: dict[str, Any]) -> int | None:
    """The attention window a config gives some or all layers, if it is shorter than its context: Mistral's
    ``sliding_window``, Qwen2's only with ``use_sliding_window``, or any layer of kind ``sliding_attention``."""
    window = config.get("sliding_window")
    kinds = config.get("layer_types") or []
    if not window or not (config.get("use_sliding_window", True) or "sliding_attention" in kinds):
        return None
    if kinds and "sliding_attention" not in kinds:
        return None
    return int(window) if int(window) < int(config.get("max_position_embeddings") or 1 << 62) else None


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a printable character for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTES = _byte_alphabet()


def _as_byte_level(piece: str) -> str:
    """A SentencePiece piece as GPT-2's byte-level text of the bytes it stands for."""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        raw = bytes([int(piece[3:5], 16)])
    else:
        raw = piece.replace("\u2581", " ").encode("utf-8")
    return "".join(_BYTES[b] for b in raw)


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config's rotary settings, under either key: ``rope_scaling`` (transformers 4) or ``rope_parameters``
    (transformers 5, which writes it for every model, usually with ``rope_type: "default"``)."""
    found = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(found, dict) and isinstance(found.get("full_attention"), dict):  # per layer kind (Gemma 3)
        found = found["full_attention"]
    return {"rope_theta": config.get("rope_theta", 10000.0), **(found if isinstance(found, dict) else {})}


def local_rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of Gemma 3's sliding-window layers: under ``rope_parameters["sliding_attention"]``, or
    transformers 4's ``rope_local_base_freq``, plain RoPE with base 10,000 where the config says neither (its
    default)."""
    found = config.get("rope_parameters")
    if isinstance(found, dict) and isinstance(found.get("sliding_attention"), dict):
        return {"rope_theta": 10000.0, **found["sliding_attention"]}
    return {"rope_theta": float(config.get("rope_local_base_freq") or 10000.0), "rope_type": "default"}


def rope_type(config: dict[str, Any]) -> str:
    settings = rope_settings(config)
    kind = str(settings.get("rope_type") or settings.get("type") or "default")
    return "longrope" if kind == "su" else kind  # Phi-3's first configs call LongRoPE "su"


def rope_factors(settings: dict[str, Any], head_dim: int) -> Any:
    """Rope scaling as one divisor per rotary frequency (what llama.cpp writes as ``rope_freqs``), or None for
    plain RoPE. ``linear``: ``factor`` for every frequency. ``llama3``: 1 for short wavelengths, ``factor`` for long
    ones, a smooth blend between."""
    import numpy as np

    kind = settings.get("rope_type") or settings.get("type") or "default"
    factor = float(settings.get("factor", 8.0))
    if kind == "linear":
        return np.full(head_dim // 2, factor, dtype=np.float32)
    if kind != "llama3":
        return None
    base = float(settings.get("rope_theta", 10000.0))
    low, high = float(settings.get("low_freq_factor", 1.0)), float(settings.get("high_freq_factor", 4.0))
    old_context = float(settings.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, blended))
    return out.astype(np.float32)


def _write_tokenizer(w: Any, tok: Any) -> None:
    """The byte-level BPE vocabulary and merges, special tokens as control tokens, ids and the chat template.

    OpenVINO GenAI's GGUF reader takes byte-level BPE (``gpt2``) vocabularies only. A SentencePiece one is written
    as one: each piece as the bytes it stands for (``▁`` a space, ``<0x0A>`` that byte), in GPT-2's byte-to-text
    alphabet, its merges likewise. The pipeline never tokenizes (tokenwire hands it ids), but its grammar backend
    reads each token's bytes from this vocabulary, so they must be the right ones."""
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data["model"]
    spm = _sentencepiece(model)
    vocab = {(_as_byte_level(text) if spm else text): i for text, i in model["vocab"].items()}
    special = {t["content"] for t in data.get("added_tokens", [])}
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    if spm:  # pieces that stand for the same bytes (a character and its byte piece) keep their own ids
        for text, i in model["vocab"].items():
            tokens[i] = _as_byte_level(text)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    if spm:
        merges = [[_as_byte_level(a), _as_byte_level(b)] for a, b in merges]
    w.add_token_merges([" ".join(m) for m in merges])
    for name, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if isinstance(value, int):
            getattr(w, f"add_{name}_token_id")(value)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
