"""Resolve a model reference and load it with transformers.

References are resolved by engine/models.py. A GGUF file is dequantized by
transformers once (~14 s for the default model) and the result is saved as a plain model folder in the cache
directory, keyed by a hash of the file's content (models.gguf_cache_key), so later starts, from any copy or
install of the file, load it in about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tokenwire.engine.models import ResolvedModel, cache_dir, gguf_cache_key

log = logging.getLogger(__name__)


def _convert_gguf(resolved: ResolvedModel, target: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a plain float32 model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one time; later starts use the cache at %s)", resolved.gguf_file, target)
    tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)


def local_folder(resolved: ResolvedModel) -> str:
    """Return a folder or hub id loadable without ``gguf_file``, converting a GGUF once if needed."""
    if resolved.gguf_file is None:
        return resolved.path
    gguf = Path(resolved.path) / resolved.gguf_file
    target = cache_dir() / f"{Path(resolved.gguf_file).stem}-{gguf_cache_key(gguf)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(resolved, target)
    return str(target)


def load(resolved: ResolvedModel, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load model and tokenizer; returns ``(model, tokenizer)`` with the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_folder(resolved)
    tok = AutoTokenizer.from_pretrained(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except ValueError as exc:  # a class without an SDPA path (Gemma 2: its logit soft-capping): plain attention
        if "attention implementation" not in str(exc):
            raise
        log.info("%s has no SDPA attention; using eager attention", folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok
