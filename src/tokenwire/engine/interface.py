"""The contract between the server and any engine backend.

The server hands the engine a :class:`GenerationRequest` and reads :class:`RequestOutput` items from an async
iterator: one ``STARTED`` (prompt tokenized, queued), then ``DELTA`` items whose texts concatenate to the
generation's final text, then exactly one ``FINISHED``. Closing the iterator early aborts the request; the
engine frees its slot within one step. Failures are raised from the iterator as :class:`EngineError`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # the client cancelled or went away


class ErrorCode(enum.StrEnum):
    """Error codes of the wire protocol (PROTOCOL.md); the engine uses a subset."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TYPE = "unknown_type"
    DUPLICATE_ID = "duplicate_id"
    NOT_FOUND = "not_found"
    PROMPT_TOO_LONG = "prompt_too_long"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    SLOW_CONSUMER = "slow_consumer"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"


class EngineError(Exception):
    """A request the engine cannot serve; ``code`` is a protocol error code, ``param`` the field at fault."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable them."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens even past the end-of-sequence token (benchmarks, tests)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(slots=True, frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt`` and ``messages`` is set."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    raw: bool = False  # a prompt is fed as-is instead of as one user turn of the chat template
    truncate: bool = False  # drop the oldest turns (keeping the system message) when the prompt is too long


class OutputKind(enum.Enum):
    STARTED = "started"
    DELTA = "delta"
    FINISHED = "finished"


@dataclass(slots=True, frozen=True)
class Timings:
    """Milliseconds from submission: waiting for a slot, to the first token, in all."""

    queue_ms: float
    ttft_ms: float
    total_ms: float
    tokens_per_second: float


@dataclass(slots=True, frozen=True)
class GenerationStart:
    prompt_tokens: int
    truncated_messages: int = 0  # how many turns truncate="auto" dropped


@dataclass(slots=True)
class RequestOutput:
    """One item of a generation's output stream (see the module docstring for the order)."""

    request_id: str
    kind: OutputKind
    text: str = ""  # the text delta (DELTA; FINISHED may carry a last piece)
    num_tokens: int = 0  # tokens this item accounts for
    start: GenerationStart | None = None  # STARTED
    finish_reason: FinishReason | None = None  # FINISHED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None  # FINISHED


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    kv_cache_tokens_used: int = 0
    kv_cache_tokens_capacity: int = 0
    steps: int = 0


class Engine(Protocol):
    """What every backend provides. All methods are called from the asyncio event loop."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_context(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model and start the model loop (off the event loop)."""

    async def shutdown(self) -> None:
        """Abort everything and stop the model loop."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Submit ``request``; iterate its outputs. Closing the iterator aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``FINISHED`` and ``FinishReason.CANCELLED``."""

    def stats(self) -> EngineStats: ...
