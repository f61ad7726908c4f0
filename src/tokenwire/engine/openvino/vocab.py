"""A tokenizer's vocabulary as OpenVINO GenAI's GGUF reader takes it: byte-level BPE (``gpt2``) only.

A byte-level BPE vocabulary is written as it is; a SentencePiece BPE one (with byte fallback: Llama 2, Mistral,
Gemma, Phi-3) as one too: each piece as the bytes it stands for (``▁`` a space, ``<0x0A>`` that byte), in GPT-2's
byte-to-text alphabet, its merges likewise (:func:`write_tokenizer`).
"""

from __future__ import annotations

import json
import re
from typing import Any


def is_sentencepiece(model: dict[str, Any]) -> bool:
    """A tokenizer.json model converted from SentencePiece BPE (Llama 2, Mistral, TinyLlama): byte fallback."""
    return bool(model.get("byte_fallback"))


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a printable character for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_BYTES = byte_alphabet()


def as_byte_level(piece: str) -> str:
    """A SentencePiece piece as GPT-2's byte-level text of the bytes it stands for."""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        raw = bytes([int(piece[3:5], 16)])
    else:
        raw = piece.replace("\u2581", " ").encode("utf-8")
    return "".join(_BYTES[b] for b in raw)


def write_tokenizer(w: Any, tok: Any) -> None:
    """The byte-level BPE vocabulary and merges, special tokens as control tokens, ids and the chat template.

    OpenVINO GenAI's GGUF reader takes byte-level BPE (``gpt2``) vocabularies only. A SentencePiece one is written
    as one: each piece as the bytes it stands for (``▁`` a space, ``<0x0A>`` that byte), in GPT-2's byte-to-text
    alphabet, its merges likewise. The pipeline never tokenizes (tokenwire hands it ids), but its grammar backend
    reads each token's bytes from this vocabulary, so they must be the right ones."""
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data["model"]
    spm = is_sentencepiece(model)
    vocab = {(as_byte_level(text) if spm else text): i for text, i in model["vocab"].items()}
    special = {t["content"] for t in data.get("added_tokens", [])}
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    if spm:  # pieces that stand for the same bytes (a character and its byte piece) keep their own ids
        for text, i in model["vocab"].items():
            tokens[i] = as_byte_level(text)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    if spm:
        merges = [[as_byte_level(a), as_byte_level(b)] for a, b in merges]
    w.add_token_merges([" ".join(m) for m in merges])
    for name, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if isinstance(value, int):
            getattr(w, f"add_{name}_token_id")(value)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
