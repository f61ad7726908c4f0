"""The contract between the server and any engine backend.

The server hands the engine a :class:`GenerationRequest` and reads :class:`RequestOutput` items from an async
iterator: one ``STARTED`` (prompt tokenized, queued), then ``DELTA`` items whose texts concatenate to the
generation's final text, then exactly one ``FINISHED``. Closing the iterator early aborts the request; the
engine frees its slot within one step. Failures are raised from the iterator as :class:`EngineError`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # the client cancelled or went away


class EngineErrorCode(enum.StrEnum):
    """Why the engine refuses or fails a request. The server maps each to the wire code of the same name
    (server/requests/errors.py, which also holds the codes only the server uses)."""

    INVALID_REQUEST = "invalid_request"
    DUPLICATE_ID = "duplicate_id"
    PROMPT_TOO_LONG = "prompt_too_long"
    OVERLOADED = "overloaded"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"


class EngineError(Exception):
    """A request the engine cannot serve: ``code`` says why, ``param`` names the field at fault."""

    def __init__(
        self, code: EngineErrorCode, message: str, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds after which trying again may succeed (overloaded, rate_limited)


# Below these, sampling is not numerically possible: logits / 1e-300 overflow float32 to inf, and a softmax over
# inf is NaN. Every door refuses them (naming the parameter) and SamplingParams cannot hold them.
MIN_TEMPERATURE = 1e-3  # other than 0 (greedy)
MIN_REPETITION_PENALTY = 1e-2
MAX_TEMPERATURE = 10.0
MAX_REPETITION_PENALTY = 10.0


class InvalidParam(ValueError):
    """A sampling parameter out of its range; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable them.

    Construction checks that every value can be sampled (:class:`InvalidParam` otherwise), so no request can
    carry a value that would fail a batch it shares with others."""

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
    # Structured output: the answer is JSON valid against this JSON Schema (its JSON text), enforced by constrained
    # decoding: tokens that cannot continue a valid document are never sampled. The server has checked the schema.
    json_schema: str | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, param: str, what: str) -> None:
            if not ok:
                raise InvalidParam(param, f'"{param}" must be {what}')

        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            need(math.isfinite(getattr(self, name)), name, "a finite number")
        need(self.max_tokens >= 1, "max_tokens", "at least 1")
        t = self.temperature
        need(
            t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE,
            "temperature",
            f"0 (greedy) or from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}",
        )
        need(0.0 < self.top_p <= 1.0, "top_p", "greater than 0 and at most 1")
        need(self.top_k >= 0, "top_k", "0 (off) or more")
        need(0.0 <= self.min_p <= 1.0, "min_p", "from 0 to 1")
        need(
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"from {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g}",
        )
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "from -2 to 2")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "from -2 to 2")
        need(self.seed is None or 0 <= self.seed < 1 << 63, "seed", "from 0 to 2^63-1")

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
    # Who asked, for fair admission when requests wait for a row (admission.py): the API key's digest (or ""),
    # and the connection it came on.
    tenant: str = ""
    connection: str = ""
    # Set to go on with a generation begun elsewhere (another replica that died): the prompt is these ids as they
    # are (prompt, messages and truncate are not read), and the output starts after ``generated_ids``.
    continuation: Continuation | None = None
    # Tools the model may call: each function as JSON text ({"type": "function", "function": {...}}). A chat
    # template with a tool format renders them itself; without one, ``tools_text`` joins the system message.
    tools: tuple[str, ...] = ()
    tools_text: str = ""


@dataclass(slots=True, frozen=True)
class Continuation:
    """A generation to go on with: its prompt's token ids, and the tokens it had generated (already delivered)."""

    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...] = ()


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
    prompt_ids: tuple[int, ...] = ()  # the prompt's token ids (a shared journal keeps them for failover)


@dataclass(slots=True)
class RequestOutput:
    """One item of a generation's output stream (see the module docstring for the order)."""

    request_id: str
    kind: OutputKind
    text: str = ""  # the text delta (DELTA; FINISHED may carry a last piece)
    num_tokens: int = 0  # tokens this item accounts for
    token_ids: tuple[int, ...] = ()  # ... and their ids, in order
    start: GenerationStart | None = None  # STARTED
    finish_reason: FinishReason | None = None  # FINISHED
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # FINISHED: prompt tokens whose KV came from the prefix cache
    timings: Timings | None = None  # FINISHED


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    paused: int = 0  # generations out of the batch until their reader catches up
    kv_cache_tokens_used: int = 0
    kv_cache_tokens_capacity: int = 0
    kv_cache_tokens_paused: int = 0  # KV positions kept for paused requests, outside the running rows
    kv_cache_tokens_budget: int = 0  # the KV positions the engine may use at most (--kv-cache-tokens)
    steps: int = 0
    backend: str = ""  # the engine that runs the model: transformers, openvino


class Engine(Protocol):
    """What every backend provides. All methods are called from the asyncio event loop."""

    @property
    def model_name(self) -> str:
        """The model's name to clients: what answers and model lists show."""
        ...

    @property
    def model_aliases(self) -> tuple[str, ...]:
        """Other names a request may use for the model (``--served-model-name``'s after the first)."""
        ...

    @property
    def max_context(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model and start the model loop (off the event loop)."""

    def health(self) -> str | None:
        """None while the engine works; else why it stopped working (its loop died or hangs). The server stops
        then, so that its supervisor starts a fresh process."""

    async def shutdown(self) -> None:
        """Abort everything and stop the model loop."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Submit ``request``; iterate its outputs. Closing the iterator aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``FINISHED`` and ``FinishReason.CANCELLED``."""

    def pause(self, request_id: str) -> None:
        """Take a request out of the running batch until :meth:`unpause`: it computes nothing meanwhile. Unknown
        ids are ignored."""

    def unpause(self, request_id: str) -> None:
        """Let a paused request go on where it stopped. Unknown or running ids are ignored."""

    def stats(self) -> EngineStats: ...
