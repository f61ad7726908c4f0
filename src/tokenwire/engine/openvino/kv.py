"""How many tokens the OpenVINO pipeline's KV cache holds: ``--kv-cache-tokens``, at most what ``KV_BYTES`` hold.

OpenVINO GenAI allocates the whole cache when the pipeline is built, and refuses to start when it does not fit in
the machine's memory ("Requested cache blocks require more memory than available"). ``--kv-cache-tokens``
defaults to 131,072 tokens, which the default model keeps in 1.6 GiB but Phi-3-mini (3.8B, no grouped KV heads)
would need 26 GiB for: so the cache is what the setting asks or what ``KV_BYTES`` hold, whichever is fewer, and
never less than one whole context. The bytes a token takes are read from the model's shape (layers, KV heads,
head size) and the cache's precision: the CPU's default, u8 with a scale and a zero point (float32) per head and
token; float16 on a GPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenwire.engine import models

log = logging.getLogger(__name__)

KV_BYTES = 2 << 30


@dataclass(frozen=True, slots=True)
class KVShape:
    """What one token's keys and values are made of."""

    layers: int
    kv_heads: int
    head_size: int

    def bytes_per_token(self, device: str) -> int:
        per_head = self.head_size * 2 if device == "GPU" else self.head_size + 8  # u8 and its scale and zero point
        return self.layers * 2 * self.kv_heads * per_head


def shape_of(source: Path) -> KVShape | None:
    """The KV shape of a GGUF file (its header) or a model folder (its config.json); None where neither says."""
    if source.is_file():
        header = models.gguf_header(source)
        arch = header.get("general.architecture")

        def number(key: str) -> int | None:
            value = header.get(f"{arch}.{key}")
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        layers, embd, heads = number("block_count"), number("embedding_length"), number("attention.head_count")
        kv_heads, size = number("attention.head_count_kv") or heads, number("attention.key_length")
    else:
        try:
            config = json.loads((source / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config = config.get("text_config", config) if isinstance(config, dict) else {}
        layers, embd = config.get("num_hidden_layers"), config.get("hidden_size")
        heads = config.get("num_attention_heads")
        kv_heads, size = config.get("num_key_value_heads") or heads, config.get("head_dim")
    if not (isinstance(layers, int) and isinstance(kv_heads, int)):
        return None
    if not isinstance(size, int):
        if not (isinstance(embd, int) and isinstance(heads, int) and heads):
            return None
        size = embd // heads
    return KVShape(layers, kv_heads, size)


def cache_tokens(asked: int, per_token: int | None, context: int) -> int:
    """The tokens the cache holds: ``asked``, at most what ``KV_BYTES`` hold at ``per_token`` bytes (None: as
    asked), at least ``context``."""
    if per_token is None or per_token <= 0:
        return asked
    return max(min(asked, KV_BYTES // per_token), min(context, asked))


def size_for(asked: int, source: Path, device: str, context: int) -> int:
    """:func:`cache_tokens` for the model at ``source`` (a GGUF file or a model folder) on ``device`` (CPU, GPU);
    logged when fewer than ``asked``."""
    shape = shape_of(source)
    per_token = shape.bytes_per_token(device) if shape is not None else None
    tokens = cache_tokens(asked, per_token, context)
    if per_token is not None and tokens < asked:
        log.info(
            "KV cache: %d tokens (%.0f MiB, %d bytes a token), not --kv-cache-tokens %d: at most what %d GiB hold",
            tokens,
            tokens * per_token / (1 << 20),
            per_token,
            asked,
            KV_BYTES >> 30,
        )
    return tokens
