"""Build the engine named by the settings. The only place the server side reaches a backend."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from tokenwire.config import Settings
from tokenwire.engine import gguf_choice, models
from tokenwire.engine.interface import Engine
from tokenwire.engine.loop import LoopEngine
from tokenwire.engine.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

ENGINES = ("auto", "openvino", "transformers", "llamacpp")


def choose_engine(settings: Settings) -> tuple[str, str]:
    """Which engine serves ``settings``, and why (for the log). ``auto``: OpenVINO wherever it can run the model."""
    if settings.engine not in ENGINES:
        raise ValueError(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
    if settings.json_whitespace not in ("compact", "flexible"):
        raise ValueError(f"--json-whitespace must be compact or flexible, not {settings.json_whitespace!r}")
    if settings.prefix_caching not in ("on", "off"):
        raise ValueError(f"--prefix-caching must be on or off, not {settings.prefix_caching!r}")
    if settings.flash_attention not in FLASH_ATTENTION:
        raise ValueError(f"--flash-attention must be auto, on or off, not {settings.flash_attention!r}")
    if settings.engine != "auto":
        return settings.engine, "--engine " + settings.engine
    if settings.device.startswith("cuda"):
        return "transformers", f"--device {settings.device}"
    from tokenwire.engine.openvino.model import plan

    resolved = models.resolve(settings.model)
    try:
        found = plan(resolved)
    except models.NotForOpenVINO as exc:
        why = str(exc).split(" (use ", 1)[0]
        if resolved.gguf_file is not None and llama_cpp_installed():
            return "llamacpp", f"{why}; llama.cpp reads it"
        layout_why = _llama_cpp_layout(resolved)
        if layout_why == "":
            return "llamacpp", f"{why}; written in llama.cpp's own layout, llama.cpp reads it"
        why += f"; {layout_why}" if layout_why else ""
        unknown = transformers_cannot_load(resolved)
        if unknown is not None:
            raise ValueError(f"no engine can serve this model: {why}; and {unknown}") from None
        return "transformers", why
    if importlib.util.find_spec("openvino_genai") is None:
        return "transformers", "openvino-genai is not installed"
    if settings.device == "auto" and _cuda_available():
        return "transformers", "a CUDA device is present"
    if resolved.gguf_file is not None and settings.quantize == "auto" and llama_cpp_installed():
        return gguf_choice.faster_for_gguf(
            (Path(resolved.path) / resolved.gguf_file).stat().st_size, settings.max_batch_size, gguf_choice.cpu_flags()
        )
    if found.convert:
        return "openvino", "a Hugging Face folder of a family it converts, converted to OpenVINO IR once, on the CPU"
    return "openvino", "the model is a GGUF file (converted to OpenVINO IR once) or an IR folder, on the CPU"


def _llama_cpp_layout(resolved: models.ResolvedModel) -> str | None:
    """For a local folder of a family the llamacpp engine writes in llama.cpp's own layout (Gemma 2): "" where it
    can serve it, else why not; None for any other model."""
    from tokenwire.engine.llamacpp import layout

    folder = Path(resolved.path)
    if resolved.gguf_file is not None or layout.architecture(folder) is None:
        return None
    if not llama_cpp_installed():
        return "pip install 'tokenwire[llamacpp]' serves it on llama.cpp"
    why = layout.refusal(folder)
    return "" if why is None else f"nor can llama.cpp's own layout: {why}"


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def transformers_cannot_load(resolved: models.ResolvedModel) -> str | None:
    """Why the transformers engine could not load a local model folder (its architecture is not a causal language
    model this transformers knows), or None (it can, or it is not a local folder: loading will tell)."""
    import json

    config = Path(resolved.path) / "config.json"
    if resolved.gguf_file is not None or not config.is_file():
        return None
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not architectures or any(a in known for a in architectures):
        return None
    return f"its architecture {architectures[0]} is not a causal language model transformers {__version__} knows"


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def prepare_model(settings: Settings) -> str:
    """Fill the caches a first start with ``settings`` fills; returns a line saying what is ready."""
    kind, why = choose_engine(settings)
    log.info("engine: %s (%s)", kind, why)
    resolved = models.resolve(settings.model)
    if kind == "openvino":
        from tokenwire.engine.openvino.model import plan, prepare

        found = plan(resolved)
        source = found.weights(settings.quantize)
        prepared = prepare(found, settings.max_model_len)
        return f"openvino: {source} (context {prepared.max_context} tokens) is ready"
    if kind == "llamacpp":
        from tokenwire.engine.llamacpp.engine import gguf_of
        from tokenwire.engine.openvino.model import Plan, prepare

        gguf = gguf_of(resolved)
        prepared = prepare(Plan(gguf), settings.max_model_len)  # its tokenizer, read from the file once
        return f"llamacpp: {gguf} (context up to {prepared.max_context} tokens) is ready"
    from tokenwire.engine.hf import loader  # imports torch

    return f"transformers: {loader.local_folder(resolved)} is ready"


def served_names(settings: Settings) -> tuple[str, ...]:
    """``--served-model-name``: the names clients may use, the one shown first (empty: the model's own)."""
    raw = settings.served_model_name or ""
    names = tuple(n.strip() for n in raw.split(","))
    if raw.strip() and not all(names):
        raise ValueError(f"--served-model-name has an empty name in {raw!r}; separate names with single commas")
    return tuple(dict.fromkeys(names)) if raw.strip() else ()


def build_engine(settings: Settings) -> Engine:
    names = served_names(settings)
    engine = _build(settings)
    engine.serve_as(names)
    return engine


FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}  # llama.cpp's llama_flash_attn_type


def _build(settings: Settings) -> LoopEngine:
    kind, why = choose_engine(settings)
    log.info("engine: %s (%s)", kind, why)
    if kind != "llamacpp" and settings.flash_attention != "auto":
        raise ValueError(f"--flash-attention is the llamacpp engine's; the {kind} engine chooses its own attention")
    build = {"openvino": _openvino, "llamacpp": _llamacpp, "transformers": _transformers}[kind]
    return build(settings)


def _shared(settings: Settings) -> dict[str, Any]:
    """The fields every engine's config takes from the settings alike."""
    return {
        "model": settings.model,
        "max_model_len": settings.max_model_len,
        "threads": settings.threads,
        "queue_timeout": settings.queue_timeout,
        "hang_timeout": settings.engine_hang_timeout,
        "json_whitespace": settings.json_whitespace,
    }


def _device(settings: Settings, quantize: str) -> dict[str, Any]:
    """Where and in what form the weights run (the openvino and transformers engines)."""
    return {"device": settings.device, "dtype": settings.dtype, "quantize": quantize}


def _scheduler(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        max_batch_size=settings.max_batch_size,
        max_waiting=settings.max_waiting,
        kv_cache_tokens=settings.kv_cache_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefix_caching=settings.prefix_caching == "on",
    )


def _openvino(settings: Settings) -> LoopEngine:
    from tokenwire.engine.openvino.engine import OVEngine, OVEngineConfig

    limits = _scheduler(settings)  # the pipeline's own scheduler takes the same limits
    return OVEngine(
        OVEngineConfig(
            **_shared(settings),
            **_device(settings, settings.quantize),
            max_batch_size=limits.max_batch_size,
            max_waiting=limits.max_waiting,
            kv_cache_tokens=limits.kv_cache_tokens,
            max_prefill_tokens=limits.max_prefill_tokens,
            prefix_caching=limits.prefix_caching,
        )
    )


def _llamacpp(settings: Settings) -> LoopEngine:
    from tokenwire.engine.llamacpp.engine import LlamaCppEngine, LlamaCppEngineConfig

    file = models.resolve(settings.model).gguf_file is not None
    if settings.quantize not in ("auto", "none", "int8") or (file and settings.quantize == "int8"):
        raise ValueError(
            f"--quantize {settings.quantize}: the llamacpp engine serves a GGUF file's own weights (pick a file of "
            "the type you want, or --engine openvino), and writes a folder's matrices as int8 (Q8_0, auto) or none "
            "(float16)"
        )
    if settings.device not in ("auto", "cpu"):
        raise ValueError(f"--device {settings.device}: the llamacpp engine runs on the CPU (--device cpu)")
    config = LlamaCppEngineConfig(
        **_shared(settings),
        scheduler=_scheduler(settings),
        quantize=settings.quantize,
        flash_attention=FLASH_ATTENTION[settings.flash_attention],
    )
    return LlamaCppEngine(config)


def _transformers(settings: Settings) -> LoopEngine:
    from tokenwire.engine.hf.engine import HFEngine, HFEngineConfig  # imports torch

    quantize = "none" if settings.quantize == "auto" else settings.quantize
    return HFEngine(HFEngineConfig(**_shared(settings), **_device(settings, quantize), scheduler=_scheduler(settings)))
