"""Server-to-client messages. Every one carries ``content`` and ``finished`` (the tutorial's client reads them)."""

from __future__ import annotations

from typing import Any

from tokenwire.engine.interface import FinishReason, Timings
from tokenwire.server.requests.errors import ErrorCode
from tokenwire.server.streaming.wire import encode as encode  # the door's messages are written as every door's


def hello(session: str, model: str, limits: dict[str, int], heartbeat_s: float, engine: str = "") -> dict[str, Any]:
    return {
        "type": "hello",
        "content": f"tokenwire ready: {model}",
        "finished": False,
        "session": session,
        "model": model,
        "engine": engine,
        "protocol": 1,
        "limits": {**limits, "heartbeat_s": heartbeat_s},
    }


def started(
    gen_id: str, model: str, prompt_tokens: int, resume_token: str, truncated_messages: int = 0
) -> dict[str, Any]:
    """``resume_token`` lets the client take the generation over from a connection the server still holds open."""
    msg: dict[str, Any] = {
        "type": "started",
        "id": gen_id,
        "seq": 0,
        "content": "",
        "finished": False,
        "model": model,
        "prompt_tokens": prompt_tokens,
        "resume_token": resume_token,
    }
    if truncated_messages:  # truncate="auto" left out this many of the oldest turns to fit the context
        msg["truncated_messages"] = truncated_messages
    return msg


def token(gen_id: str, seq: int, text: str, tokens: int, batched: bool) -> dict[str, Any]:
    return {
        "type": "tokens" if batched else "token",
        "id": gen_id,
        "seq": seq,
        "content": text,
        "finished": False,
        "tokens": tokens,
    }


def complete(
    gen_id: str,
    seq: int,
    reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    timings: Timings | None,
    cached_tokens: int = 0,
    tokens: int = 0,
) -> dict[str, Any]:
    """``usage.cached_tokens``: prompt tokens whose KV came from the prefix cache (0 on an engine without one).
    ``tokens``: the generated tokens no text message covered (the end-of-sequence token, a stop string's, a
    character left incomplete by max_tokens), so that a generation's ``tokens`` add up to its completion tokens."""
    return {
        "type": "complete",
        "id": gen_id,
        "seq": seq,
        "content": "",
        "finished": True,
        "tokens": tokens,
        "finish_reason": reason.value,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cached_tokens": cached_tokens,
        },
        "timings": {
            "queue_ms": timings.queue_ms if timings else 0.0,
            "ttft_ms": timings.ttft_ms if timings else 0.0,
            "total_ms": timings.total_ms if timings else 0.0,
            "tokens_per_second": timings.tokens_per_second if timings else 0.0,
        },
    }


def error(
    code: ErrorCode,
    content: str,
    gen_id: str | None = None,
    param: str | None = None,
    seq: int | None = None,
    retry_after: float | None = None,
) -> dict[str, Any]:
    """``seq`` is set when the error ends a generation (it is that generation's last message); ``retry_after_s``
    when trying again later may succeed (overloaded, rate_limited)."""
    msg: dict[str, Any] = {"type": "error", "code": code.value, "content": content, "finished": True}
    if retry_after is not None:
        msg["retry_after_s"] = retry_after
    if gen_id is not None:
        msg["id"] = gen_id
    if seq is not None:
        msg["seq"] = seq
    if param is not None:
        msg["param"] = param
    return msg


def resumed(gen_id: str, after_seq: int, last_seq: int, running: bool) -> dict[str, Any]:
    """The answer to ``resume``: the messages after ``after_seq`` follow, then live ones if ``running``."""
    return {
        "type": "resumed",
        "id": gen_id,
        "content": "",
        "finished": False,
        "after_seq": after_seq,
        "last_seq": last_seq,
        "running": running,
    }


def pong(ts: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "pong", "content": "", "finished": False}
    if ts is not None:
        msg["ts"] = ts
    return msg


def ping(ts: float) -> dict[str, Any]:
    return {"type": "ping", "content": "", "finished": False, "ts": ts}


def notice(content: str, level: str = "info", code: str | None = None, **extra: Any) -> dict[str, Any]:
    """A message for the person at the client (an operator's broadcast, the server restarting); not about any
    generation. Clients that do not know the type ignore it (PROTOCOL.md)."""
    msg: dict[str, Any] = {"type": "notice", "content": content, "finished": False, "level": level}
    if code is not None:
        msg["code"] = code
    msg.update(extra)
    return msg
