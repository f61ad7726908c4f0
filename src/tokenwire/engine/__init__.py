"""The engine: requests in, text deltas out. No JSON, no HTTP.

Importing this package does not import torch; backends live in subpackages (``tokenwire.engine.hf``).
"""

from tokenwire.engine.interface import (
    ChatMessage,
    Continuation,
    Engine,
    EngineError,
    EngineErrorCode,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationStart,
    InvalidParam,
    OutputKind,
    RequestOutput,
    SamplingParams,
    Timings,
)

__all__ = [
    "ChatMessage",
    "Continuation",
    "Engine",
    "EngineError",
    "EngineErrorCode",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationStart",
    "InvalidParam",
    "OutputKind",
    "RequestOutput",
    "SamplingParams",
    "Timings",
]
