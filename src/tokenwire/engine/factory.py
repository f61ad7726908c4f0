"""Build the engine named by the settings. The only place the server side reaches a backend."""

from __future__ import annotations

from tokenwire.config import Settings
from tokenwire.engine.interface import Engine
from tokenwire.engine.scheduler import SchedulerConfig


def build_engine(settings: Settings) -> Engine:
    from tokenwire.engine.hf.engine import HFEngine, HFEngineConfig  # imports torch

    return HFEngine(
        HFEngineConfig(
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            quantize=settings.quantize,
            max_model_len=settings.max_model_len,
            threads=settings.threads,
            scheduler=SchedulerConfig(
                max_batch_size=settings.max_batch_size,
                max_waiting=settings.max_waiting,
                kv_cache_tokens=settings.kv_cache_tokens,
                max_prefill_tokens=settings.max_prefill_tokens,
            ),
        )
    )
