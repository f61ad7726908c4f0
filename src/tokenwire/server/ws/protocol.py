"""Parsing and validation of client messages: text in, a typed message or a :class:`RequestError` out.

Pure functions, no I/O: the WebSocket handler and the tests call them the same way. Every error names the
field at fault (``param``) and says what was expected, so that a client author can fix the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, SamplingParams
from tokenwire.server.requests import params, strictjson
from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.requests.params import FieldError, Limits

PROTOCOL_VERSION = 1


@dataclass(slots=True, frozen=True)
class BatchPolicy:
    """Coalesce text into ``tokens`` messages of at most ``max_tokens`` tokens or ``max_ms`` milliseconds."""

    max_tokens: int | None = None
    max_ms: float | None = None


@dataclass(slots=True, frozen=True)
class Generate:
    id: str | None
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    raw: bool = False
    truncate: bool = False
    batch: BatchPolicy | None = None
    model: str | None = None  # the model it asks for: one of the served names (checked by the connection)


@dataclass(slots=True, frozen=True)
class Cancel:
    id: str


@dataclass(slots=True, frozen=True)
class Ping:
    ts: Any = None


@dataclass(slots=True, frozen=True)
class Pong:
    pass


@dataclass(slots=True, frozen=True)
class Resume:
    """Continue a generation on this connection: every message after ``after_seq`` (-1: from ``started``).

    ``session`` (the ``hello`` of the connection that started it) tells apart generations of the same id."""

    id: str
    after_seq: int = -1
    session: str | None = None
    resume_token: str | None = None  # from ``started``: needed to take over a generation whose connection is open


ClientMessage = Generate | Cancel | Ping | Pong | Resume


def parse_message(data: str | bytes, limits: Limits) -> ClientMessage:
    """Parse one frame. Raises :class:`RequestError` for anything that is not a valid message."""
    try:
        obj = strictjson.loads(data)
    except strictjson.JSONInputError as err:
        code = ErrorCode.INVALID_JSON if err.syntax else ErrorCode.INVALID_REQUEST
        raise RequestError(code, err.message, err.param) from None
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.INVALID_JSON, 'a message must be a JSON object with a "type" field')
    mtype = obj.get("type")
    if mtype is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, 'the message has no "type" field', "type")
    if not isinstance(mtype, str):
        raise RequestError(ErrorCode.INVALID_REQUEST, '"type" must be a string', "type")
    if mtype == "generate":
        return parse_generate(obj, limits)
    if mtype == "cancel":
        return Cancel(_required_id(obj, limits))
    if mtype == "ping":
        return Ping(obj.get("ts"))
    if mtype == "pong":
        return Pong()
    if mtype == "resume":
        gen_id = _required_id(obj, limits)
        after = _int(obj, "after_seq", -1, lo=-1, hi=1 << 62, id=gen_id)
        session = _token_field(obj, "session", "the session string from hello", limits, gen_id)
        token = _token_field(obj, "resume_token", "the string from the started message", limits, gen_id)
        return Resume(gen_id, after, session, token)
    shown = mtype if len(mtype) <= 40 else mtype[:40] + "..."
    raise RequestError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown message type {shown!r}; expected generate, cancel, ping, pong or resume",
        "type",
    )


def parse_generate(obj: dict[str, Any], limits: Limits) -> Generate:
    gen_id = _optional_id(obj, limits)
    try:
        return _generate(obj, gen_id, limits)
    except FieldError as bad:
        raise RequestError(ErrorCode.INVALID_REQUEST, bad.message, bad.param, id=gen_id) from None


def _generate(obj: dict[str, Any], gen_id: str | None, limits: Limits) -> Generate:
    has_prompt = obj.get("prompt") is not None
    has_messages = obj.get("messages") is not None
    if has_prompt == has_messages:
        raise FieldError('send exactly one of "prompt" (a string) and "messages" (a list of {role, content})', "prompt")
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise FieldError('"prompt" must be a string', "prompt")
        if not prompt:
            raise FieldError('"prompt" must not be empty', "prompt")
    else:
        messages = params.chat_messages(obj["messages"], limits)
    max_tokens = params.max_tokens(obj, ("max_tokens", "max_length"), limits)
    schema = params.json_schema(obj["json_schema"], "json_schema") if obj.get("json_schema") is not None else None
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise FieldError(
            '"model" must be a string (the name of the model served; leave it out for that model)', "model"
        )
    return Generate(
        id=gen_id,
        params=params.sampling_params(obj, limits, max_tokens, schema),
        prompt=prompt,
        messages=messages,
        raw=params.flag(obj, "raw"),
        truncate=_truncate(obj.get("truncate")),
        batch=_batch(obj.get("batch")),
        model=model,
    )


def _token_field(obj: dict[str, Any], name: str, what: str, limits: Limits, gen_id: str) -> str | None:
    """An optional string the server handed out (a session, a resume token), 1 to ``max_id_length`` long."""
    value = obj.get(name)
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= limits.max_id_length):
        raise RequestError(
            ErrorCode.INVALID_REQUEST,
            f'"{name}" must be {what} (1 to {limits.max_id_length} characters)',
            name,
            id=gen_id,
        )
    return value


def _optional_id(obj: dict[str, Any], limits: Limits) -> str | None:
    raw = obj.get("id")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise RequestError(ErrorCode.INVALID_REQUEST, '"id" must be a string', "id")
    gen_id = str(raw)
    if not gen_id or len(gen_id) > limits.max_id_length:
        raise RequestError(ErrorCode.INVALID_REQUEST, f'"id" must be 1 to {limits.max_id_length} characters long', "id")
    return gen_id


def _required_id(obj: dict[str, Any], limits: Limits) -> str:
    gen_id = _optional_id(obj, limits)
    if gen_id is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, f'"{obj["type"]}" needs the "id" of a generation', "id")
    return gen_id


def _int(obj: dict[str, Any], name: str, default: int, *, lo: int, hi: int, id: str | None) -> int:
    try:
        return params.integer(obj, name, default, lo=lo, hi=hi)
    except FieldError as bad:
        raise RequestError(ErrorCode.INVALID_REQUEST, bad.message, bad.param, id=id) from None


def _truncate(raw: Any) -> bool:
    if raw is None or raw is False or raw in ("none", "disabled"):
        return False
    if raw is True or raw == "auto":
        return True
    raise FieldError('"truncate" must be "auto" or "disabled"', "truncate")


def _batch(raw: Any) -> BatchPolicy | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FieldError('"batch" must be an object {"max_tokens": N, "max_ms": T}', "batch")
    n, ms = raw.get("max_tokens"), raw.get("max_ms")
    if n is None and ms is None:
        raise FieldError('"batch" needs "max_tokens" or "max_ms" (or both)', "batch")
    if n is not None and (not params.is_number(n) or n != int(n) or not 1 <= n <= 4096):
        raise FieldError('"batch.max_tokens" must be an integer from 1 to 4096', "batch.max_tokens")
    if ms is not None and (not params.is_number(ms) or not math.isfinite(ms) or not 0 <= ms <= 60_000):
        raise FieldError('"batch.max_ms" must be a number of milliseconds from 0 to 60000', "batch.max_ms")
    return BatchPolicy(int(n) if n is not None else None, float(ms) if ms is not None else None)
