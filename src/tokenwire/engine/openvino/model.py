"""How the OpenVINO worker reads a model (:func:`plan`), and what the server's process needs of it: its tokenizer,
end-of-sequence ids and context window.

A GGUF file is made into OpenVINO IR once, with weights tokenwire quantizes (engine/openvino/ir.py); a Hugging
Face folder is first written as a float16 GGUF file (engine/openvino/convert.py); an IR folder is read as it
is. tokenwire tokenizes with its own (transformers) tokenizer, the same one the transformers engine uses, so
both engines give a model the same prompt tokens. Reading a GGUF file's tokenizer takes transformers ~10 s for
the default model, so it is done once and kept in the cache directory (``<name>-<key>-tokenizer``) with a
``tokenwire.json`` written last: a folder without it, or one that does not load, is a partial or corrupt cache
and is built again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.openvino import relayout
from tokenwire.engine.openvino.relayout import REWRITTEN

log = logging.getLogger(__name__)

MARKER = "tokenwire.json"
MARKER_VERSION = 1


@dataclass(slots=True, frozen=True)
class Plan:
    """How OpenVINO will read a model: an IR folder as it is; a GGUF file, or a Hugging Face folder written as one
    first (``convert``), made into IR with weights in the ``--quantize`` format."""

    source: Path  # the GGUF file, IR folder or Hugging Face folder
    convert: bool = False  # a Hugging Face folder: written as a float16 GGUF file first
    max_context: int | None = None  # a shorter context than the file's that the route serves (LongRoPE's original)

    @property
    def as_is(self) -> bool:
        """An IR folder, read as it is (its weights are what they are: --quantize auto only)."""
        return self.source.is_dir() and not self.convert

    def weights(self, quantize: str) -> str:
        """The IR folder the worker loads (converting now, once, unless it is one already)."""
        if self.as_is:
            return str(self.source)
        from tokenwire.engine.openvino import convert, ir

        gguf = convert.converted(self.source) if self.convert else self.source
        return str(ir.converted(gguf, DEFAULT_FORMAT if quantize == "auto" else quantize))


GENAI_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF architectures OpenVINO GenAI 2026.4 builds a model of

# What --quantize auto gives a GGUF file or Hugging Face folder (docs/benchmarks.md: measured per format).
DEFAULT_FORMAT = "int8"


def plan(resolved: models.ResolvedModel) -> Plan:
    """How OpenVINO reads ``resolved``; :class:`~tokenwire.engine.models.NotForOpenVINO` (with the reason) if it
    cannot. Cheap: nothing is converted here."""
    from tokenwire.engine.openvino import convert

    if resolved.gguf_file is not None:  # read as it is
        gguf = Path(resolved.path) / resolved.gguf_file
        header = models.gguf_header(gguf)
        arch = header.get("general.architecture")
        if arch in REWRITTEN and (why := relayout.refusal(header)) is not None:
            raise models.NotForOpenVINO(
                f"the openvino engine cannot read {gguf.name}: {why} (use --engine llamacpp or --engine transformers)"
            )
        if arch is not None and arch not in GENAI_ARCHITECTURES and arch not in REWRITTEN:
            raise models.NotForOpenVINO(
                f"the openvino engine cannot read {gguf.name}: its architecture {arch} is not one OpenVINO GenAI "
                f"builds from a GGUF file ({', '.join(GENAI_ARCHITECTURES)}) or tokenwire rewrites as one "
                f"({', '.join(REWRITTEN)}) (use --engine llamacpp or --engine transformers)"
            )
        return Plan(gguf, max_context=relayout.served_context(header))
    folder = Path(resolved.path)
    if (folder / "openvino_model.xml").is_file():  # an IR folder, as `optimum-cli export openvino` writes: as is
        return Plan(folder)
    if not folder.is_dir():
        folder = _hub_snapshot(resolved.path)
    why = convert.unsupported(folder)
    if why is not None:
        raise models.NotForOpenVINO(
            f"the openvino engine cannot read {resolved.path!r}: {why} (use --engine transformers)"
        )
    return Plan(folder, convert=True)


@functools.lru_cache(maxsize=8)
def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model: from the Hugging Face cache, or downloaded now unless HF_HUB_OFFLINE.
    Only what the conversion reads is fetched (config, tokenizer, safetensors). Remembered: choosing the engine
    and building it both plan the model, and the hub is asked once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except LocalEntryNotFoundError as exc:  # no engine can load it: say so before the server starts
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise models.ModelNotFoundError(
            f"cannot get hub model {repo_id!r}: it is not in the local Hugging Face cache and the hub cannot be "
            f"reached{offline}; download it where there is a network (hf download {repo_id}), or pass a local "
            "folder or .gguf file"
        ) from exc
    except RepositoryNotFoundError as exc:  # also a gated or private one without a token
        raise models.ModelNotFoundError(
            f"the Hugging Face hub has no model {repo_id!r} that this machine may read (a private or gated one "
            "needs a token: hf auth login, or HF_TOKEN)"
        ) from exc
    except Exception as exc:
        raise models.NotForOpenVINO(
            f"the openvino engine could not get hub model {repo_id!r} ({type(exc).__name__}: {exc}) "
            "(use --engine transformers)"
        ) from exc


@dataclass(slots=True, frozen=True)
class Prepared:
    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int


def prepare(found: Plan, max_model_len: int) -> Prepared:
    """The tokenizer and limits of the model ``found`` reads."""
    from transformers import AutoTokenizer

    if found.source.is_dir():  # a Hugging Face folder, or an IR folder (optimum writes the tokenizer beside it)
        info = _folder_info(found.source)
        tokenizer = AutoTokenizer.from_pretrained(str(found.source))
    else:  # a GGUF file
        _, tokenizer, info = cached_tokenizer(found.source)
    eos = set(info.get("eos_ids") or [])
    if isinstance(tokenizer.eos_token_id, int):
        eos.add(tokenizer.eos_token_id)
    context = min(int(info.get("max_context") or max_model_len), found.max_context or max_model_len)
    return Prepared(tokenizer, frozenset(eos), min(max_model_len, context))


def tokenizer_folder(gguf: Path) -> Path:
    """The cached tokenizer folder of a GGUF file, built if missing, partial or corrupt."""
    return cached_tokenizer(gguf)[0]


def cached_tokenizer(gguf: Path) -> tuple[Path, Any, dict[str, Any]]:
    """The cached tokenizer folder of a GGUF file (built if missing, partial or corrupt), the tokenizer loaded
    from it and what its marker says."""
    target = models.cache_dir() / f"{gguf.stem}-{models.gguf_cache_key(gguf)}-tokenizer"
    loaded = _load(target)
    if loaded is None:
        if target.exists():
            log.warning("the cached tokenizer at %s is incomplete or corrupt; building it again", target)
            shutil.rmtree(target, ignore_errors=True)
        log.info("reading the tokenizer of %s (one time; cached at %s)", gguf.name, target)
        _build(gguf, target)
        loaded = _load(target)
        if loaded is None:
            raise RuntimeError(f"the tokenizer read from {gguf} does not load back from {target}")
    return target, *loaded


def _load(folder: Path) -> tuple[Any, dict[str, Any]] | None:
    """The tokenizer of a cached folder and its marker, or None if the folder is partial or corrupt."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("version") != MARKER_VERSION:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder)), info
    except Exception:
        return None


def _build(gguf: Path, target: Path) -> None:
    import tempfile

    try:
        tok, config = _read(gguf)
    except ValueError as exc:
        if "architecture" not in str(exc):
            raise
        # transformers reads the tokenizers of the architectures it knows; llama.cpp (the llamacpp engine) reads more.
        # The vocabulary is the same kind of thing whatever the layers: read it from the file's metadata as Llama's.
        log.info("transformers does not know %s's architecture; reading its vocabulary as a Llama file's", gguf.name)
        with tempfile.TemporaryDirectory(prefix="tokenwire-vocabulary-") as work:
            tok, config = _read(_metadata_as_llama(gguf, Path(work) / gguf.name))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = {
        "version": MARKER_VERSION,
        "source": gguf.name,
        "max_context": getattr(text, "max_position_embeddings", None),
        "eos_ids": _ids(getattr(config, "eos_token_id", None)),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(info))  # last: its presence says the folder is whole
    if target.exists():  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _read(gguf: Path) -> tuple[Any, Any]:
    """The tokenizer and config transformers reads from a GGUF file (ValueError naming the architecture if it does
    not know it)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return tok, AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _metadata_as_llama(gguf: Path, target: Path) -> Path:
    """A GGUF file at ``target`` with ``gguf``'s metadata (its vocabulary, chat template, context length, ...), its
    architecture named ``llama`` (its keys with it), and no tensors."""
    import gguf as gg

    from tokenwire.engine.openvino.ir import copy_metadata

    reader = gg.GGUFReader(str(gguf))
    file_type = reader.fields.get("general.file_type")
    writer = copy_metadata(reader, target, int(file_type.contents()) if file_type else 1, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _folder_info(folder: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"eos_ids": []}
    config: dict[str, Any] | None = None
    for name in ("config.json", "generation_config.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        config = data if name == "config.json" else config
        info["eos_ids"] += _ids(data.get("eos_token_id"))
        if "max_position_embeddings" in data:
            info["max_context"] = data["max_position_embeddings"]
    if config is not None and not (folder / "openvino_model.xml").is_file():
        from tokenwire.engine.openvino import convert

        with contextlib.suppress(ValueError):  # what the GGUF route serves (LongRoPE: its original context)
            info["max_context"] = convert.served_context(config)
    return info


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [int(x) for x in value if isinstance(x, int)]
    return []
