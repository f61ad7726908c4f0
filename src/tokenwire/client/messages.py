"""The client's side of the protocol, with no I/O: the ``generate`` message from typed arguments, and the
server's messages as typed values (docs/protocol.md)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict


class Sampling(TypedDict, total=False):
    """The fields of a ``generate`` besides the prompt, as docs/protocol.md names them; each is optional (the
    server's default applies), and the server checks each one."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: str | Sequence[str]
    ignore_eos: bool
    raw: bool
    truncate: str
    json_schema: Mapping[str, Any]
    batch: Mapping[str, int]


SAMPLING_FIELDS = frozenset(Sampling.__annotations__)


def generate_message(
    gen_id: str,
    prompt: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``generate`` message; a mistake the server would refuse anyway is refused here, before anything is
    sent: exactly one of ``prompt`` and ``messages``, and only the protocol's field names (a misspelt one would
    otherwise be ignored by the server)."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt and messages")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, not {type(prompt).__name__}")
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown generate parameter {unknown[0]!r} (known: {', '.join(sorted(SAMPLING_FIELDS))})")
    msg: dict[str, Any] = {"type": "generate", "id": gen_id}
    if prompt is not None:
        msg["prompt"] = prompt
    else:
        assert messages is not None
        msg["messages"] = [dict(m) for m in messages]
    for name, value in params.items():
        if value is None:
            continue
        msg[name] = list(value) if name == "stop" and not isinstance(value, str) else value
    return msg


def resume_message(gen_id: str, after_seq: int, session: str | None, resume_token: str | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "resume", "id": gen_id, "after_seq": after_seq}
    if session:
        msg["session"] = session
    if resume_token:
        msg["resume_token"] = resume_token
    return msg


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model ended its answer, or a stop string was reached
    LENGTH = "length"  # max_tokens, or the end of the context window
    CANCELLED = "cancelled"


@dataclass(slots=True, frozen=True)
class Hello:
    """The server's greeting: who it is and what it accepts."""

    session: str
    model: str
    engine: str = ""
    protocol: int = 1
    limits: Mapping[str, float] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Delta:
    """A piece of the answer: its text, how many tokens it covers, and its message's ``seq``."""

    text: str
    tokens: int
    seq: int


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Timings:
    """As the server measured them, from when it received the request."""

    queue_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens_per_second: float


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (a bool is not a number here)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_hello(msg: Mapping[str, Any]) -> Hello:
    limits = msg.get("limits")
    return Hello(
        session=str(msg.get("session") or ""),
        model=str(msg.get("model") or ""),
        engine=str(msg.get("engine") or ""),
        protocol=_int(msg.get("protocol"), 1),
        limits={str(k): v for k, v in limits.items() if number(v) is not None} if isinstance(limits, dict) else {},
    )


def parse_delta(msg: Mapping[str, Any]) -> Delta:
    return Delta(text=str(msg.get("content") or ""), tokens=_int(msg.get("tokens"), 1), seq=_int(msg.get("seq"), -1))


def parse_usage(msg: Mapping[str, Any]) -> Usage | None:
    raw = msg.get("usage")
    if not isinstance(raw, dict):
        return None
    return Usage(
        prompt_tokens=_int(raw.get("prompt_tokens")),
        completion_tokens=_int(raw.get("completion_tokens")),
        total_tokens=_int(raw.get("total_tokens")),
        cached_tokens=_int(raw.get("cached_tokens")),
    )


def parse_timings(msg: Mapping[str, Any]) -> Timings | None:
    raw = msg.get("timings")
    if not isinstance(raw, dict):
        return None
    return Timings(
        queue_ms=number(raw.get("queue_ms")) or 0.0,
        ttft_ms=number(raw.get("ttft_ms")),
        total_ms=number(raw.get("total_ms")) or 0.0,
        tokens_per_second=number(raw.get("tokens_per_second")) or 0.0,
    )


def parse_finish_reason(msg: Mapping[str, Any]) -> FinishReason | str:
    """The enum for the reasons this client knows; a newer server's other reasons as their string."""
    reason = str(msg.get("finish_reason") or "stop")
    try:
        return FinishReason(reason)
    except ValueError:
        return reason
