"""What a Hugging Face config says about positions, read as transformers reads it: each layer's attention window
(:func:`layer_windows`) and the rotary embedding's settings and scaling (:func:`rope_settings`, :func:`rope_type`,
:func:`rope_scaling`: Llama 3's and linear scaling as llama.cpp's ``rope_freqs`` divisors, Phi-3's LongRoPE as its
short factors and attention factor), under transformers 4's ``rope_scaling`` or transformers 5's
``rope_parameters``."""

from __future__ import annotations

import math
from typing import Any


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
