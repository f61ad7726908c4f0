"""Hugging Face folders written as llama.cpp's own converter writes them, for the llamacpp engine.

engine/openvino/convert.py writes a folder as the GGUF file OpenVINO GenAI builds a graph of (Llama's, Qwen2's or
Qwen3's layers, a vocabulary as bytes); llama.cpp reads that file as the folder means it only for those layers with
a byte-level vocabulary (engine/llamacpp/engine.py: ``folder_refusal``). Gemma 2 is the family no other fast engine
here serves: it soft-caps its attention scores, which OpenVINO's paged attention cannot. So a Gemma 2 folder is
written here in llama.cpp's ``gemma2`` layout, as its ``convert_hf_to_gguf.py`` writes one: its tensor names, each
norm stored as 1 + weight (Gemma's norms multiply by that), the window and both soft caps as keys, float16
matrices, and its SentencePiece vocabulary (pieces, scores, types: :func:`add_sentencepiece_vocabulary`). Once,
kept in the cache directory beside the OpenVINO route's conversions.

llama.cpp's ``gemma2`` graph fixes what the folder's config could otherwise choose, so a folder is refused
(:func:`refusal`, naming why) where they differ: every other layer windowed, the first one included; the attention
scaled by 1/sqrt(head size) (by 1/sqrt(hidden / heads) for the 46-layer 27B), where transformers scales by
1/sqrt(``query_pre_attn_scalar``); no rope scaling. Every Gemma 2 release (2B, 9B, 27B) is what llama.cpp fixes.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from tokenwire.engine.openvino import convert, positions

LAYOUTS = {"Gemma2ForCausalLM": "gemma2"}  # Hugging Face architecture -> llama.cpp's own architecture
LAYOUT_VERSION = 1
SWA_PATTERN = 2  # llama.cpp's gemma2: layer i is windowed where i % 2 == 0

# llama.cpp's SentencePiece token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def architecture(folder: Path) -> str | None:
    """The llama.cpp architecture ``folder`` is written as here, or None (not a family written here)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return LAYOUTS.get((config.get("architectures") or ["?"])[0])


def refusal(folder: Path) -> str | None:
    """Why ``folder`` (of a family in :data:`LAYOUTS`) cannot be written for llama.cpp as it means it, or None."""
    config = json.loads((folder / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or 0)
    if not list(folder.glob("*.safetensors")):
        return "it has no .safetensors weights"
    if not (folder / "tokenizer.model").is_file():
        return "it has no tokenizer.model (the SentencePiece vocabulary llama.cpp's gemma2 layout is written with)"
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "the sentencepiece package is not installed (pip install 'tokenwire[llamacpp]')"
    if positions.rope_type(config) != "default":
        return f"its rope scaling ({positions.rope_type(config)}) is not one llama.cpp's gemma2 layout applies"
    windows = positions.layer_windows(config, layers)
    expected = [i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(layers)]
    if any(windows) and [bool(w) for w in windows] != expected:
        return "its windowed layers are not every other one from the first, which llama.cpp's gemma2 layout assumes"
    scalar = float(config.get("query_pre_attn_scalar") or 0)
    if scalar and not math.isclose(scalar, _llama_cpp_scalar(config)):
        return (
            f"its attention is scaled by 1/sqrt({scalar:g}) (query_pre_attn_scalar), and llama.cpp's gemma2 "
            f"layout scales it by 1/sqrt({_llama_cpp_scalar(config):g})"
        )
    return None


def _llama_cpp_scalar(config: dict[str, Any]) -> float:
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    if int(config.get("num_hidden_layers") or 0) == 46:  # llama.cpp's "27B": hidden / heads
        return hidden / heads
    return float(config.get("head_dim") or hidden // heads)


def converted(folder: Path, matrices: str = "none") -> Path:
    """The GGUF file of ``folder`` in llama.cpp's own layout, its matrices float16 (``none``) or Q8_0 (``int8``),
    written now if missing, partial or corrupt."""
    arch = architecture(folder)
    if arch is None:
        raise ValueError(f"{folder} is not a family written in llama.cpp's own layout ({', '.join(LAYOUTS)})")
    form = f"llamacpp{LAYOUT_VERSION}-{'q8_0' if matrices == 'int8' else 'f16'}"
    what = f"llama.cpp's {arch} layout, {'Q8_0' if matrices == 'int8' else 'float16'} matrices"
    return convert.cached_gguf(folder, form, functools.partial(write, matrices=matrices), what)


def write(folder: Path, target: Path, matrices: str = "none") -> None:
    """Write the Gemma 2 folder ``folder`` at ``target`` as llama.cpp's converter writes it, its matrices as
    engine/openvino/convert.py's ``matrix_data`` writes ``matrices``."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    weights = convert._tensors(folder)
    w = gguf.GGUFWriter(str(target), "gemma2")
    w.add_name(folder.name)
    w.add_context_length(int(config.get("max_position_embeddings") or 8192))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_block_count(layers)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(positions.rope_settings(config).get("rope_theta") or 10000.0))
    w.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
    w.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
    w.add_sliding_window(positions.sliding_window(config) or int(config.get("max_position_embeddings") or 8192))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if matrices == "int8" else gguf.LlamaFileType.MOSTLY_F16)
    add_sentencepiece_vocabulary(w, folder, int(config.get("vocab_size") or 0))
    w.add_add_space_prefix(False)  # Gemma keeps spaces as they are
    for name, (key, is_norm) in gemma2_names(layers).items():
        if is_norm:
            w.add_tensor(name, weights[key] + 1.0)
        else:
            array, kind = convert.matrix_data(weights[key], matrices)
            w.add_tensor(name, array, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma2_names(layers: int) -> dict[str, tuple[str, bool]]:
    """llama.cpp's tensor names for a Gemma 2 model: each one's Hugging Face name, and whether it is a norm (stored as
    1 + weight). The output matrix is the embedding's (llama.cpp reads token_embd for both)."""
    names = {
        "token_embd.weight": ("model.embed_tokens.weight", False),
        "output_norm.weight": ("model.norm.weight", True),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": (p + "input_layernorm.weight", True),
            f"blk.{i}.attn_q.weight": (p + "self_attn.q_proj.weight", False),
            f"blk.{i}.attn_k.weight": (p + "self_attn.k_proj.weight", False),
            f"blk.{i}.attn_v.weight": (p + "self_attn.v_proj.weight", False),
            f"blk.{i}.attn_output.weight": (p + "self_attn.o_proj.weight", False),
            f"blk.{i}.post_attention_norm.weight": (p + "post_attention_layernorm.weight", True),
            f"blk.{i}.ffn_norm.weight": (p + "pre_feedforward_layernorm.weight", True),
            f"blk.{i}.ffn_gate.weight": (p + "mlp.gate_proj.weight", False),
            f"blk.{i}.ffn_up.weight": (p + "mlp.up_proj.weight", False),
            f"blk.{i}.ffn_down.weight": (p + "mlp.down_proj.weight", False),
            f"blk.{i}.post_ffw_norm.weight": (p + "post_feedforward_layernorm.weight", True),
        }
    return names


def add_sentencepiece_vocabulary(w: Any, folder: Path, vocab_size: int = 0) -> None:
    """The SentencePiece vocabulary of ``folder`` (its ``tokenizer.model``) as llama.cpp's converter writes it: the
    ``llama`` tokenizer's pieces, scores and types, then the tokenizer's added tokens (control where special, else
    user-defined), padded to ``vocab_size`` (the model's embedding rows) with unused pieces; the special tokens' ids,
    whether a BOS is added, and the chat template."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    size = max(vocab_size, sp.get_piece_size(), len(tok))
    pieces = [f"[PAD{i}]" for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for i in range(sp.get_piece_size()):
        pieces[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (
            UNKNOWN
            if sp.is_unknown(i)
            else CONTROL
            if sp.is_control(i)
            else UNUSED
            if sp.is_unused(i)
            else BYTE
            if sp.is_byte(i)
            else NORMAL
        )
    for i, added in tok.added_tokens_decoder.items():  # Gemma's <pad>, <start_of_turn>, ...
        if i < size:
            pieces[i], scores[i] = added.content, -1000.0
            types[i] = CONTROL if added.special else USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for add, value in (
        (w.add_bos_token_id, tok.bos_token_id),
        (w.add_eos_token_id, tok.eos_token_id),
        (w.add_unk_token_id, tok.unk_token_id),
        (w.add_pad_token_id, tok.pad_token_id),
    ):
        if isinstance(value, int):
            add(value)
    # whether it adds a BOS, as it does (transformers 5 says it in tokenizer.json's post-processor, not add_bos_token)
    w.add_add_bos_token(tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id])
    if isinstance(tok.chat_template, str):
        w.add_chat_template(tok.chat_template)
