"""Parsing and validation of client messages: text in, a typed message or a :class:`ProtocolError` out.

Pure functions, no I/O: the WebSocket handler and the tests call them the same way. Every error names the
field at fault (``param``) and says what was expected, so that a client author can fix the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, InvalidParam, SamplingParams
from tokenwire.server import strictjson
from tokenwire.server.errors import ErrorCode

PROTOCOL_VERSION = 1
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


@dataclass(slots=True, frozen=True)
class Limits:
    """What one request may ask for; sent to clients in ``hello``."""

    max_message_bytes: int = 1 << 20
    max_tokens: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_messages: int = 1024
    max_id_length: int = 128
    max_generations_per_connection: int = 32

    def as_dict(self) -> dict[str, int]:
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_tokens": self.max_tokens,
            "default_max_tokens": self.default_max_tokens,
            "max_generations_per_connection": self.max_generations_per_connection,
        }


class ProtocolError(Exception):
    """A message that cannot be served as sent; ``id`` is the generation it names, if any."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None, id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.id = id


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
    """Parse one frame. Raises :class:`ProtocolError` for anything that is not a valid message."""
    try:
        obj = strictjson.loads(data)
    except strictjson.JSONInputError as err:
        code = ErrorCode.INVALID_JSON if err.syntax else ErrorCode.INVALID_REQUEST
        raise ProtocolError(code, err.message, err.param) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_JSON, 'a message must be a JSON object with a "type" field')
    mtype = obj.get("type")
    if mtype is None:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, 'the message has no "type" field', "type")
    if not isinstance(mtype, str):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, '"type" must be a string', "type")
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
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown message type {shown!r}; expected generate, cancel, ping, pong or resume",
        "type",
    )


def parse_generate(obj: dict[str, Any], limits: Limits) -> Generate:
    gen_id = _optional_id(obj, limits)

    def err(message: str, param: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_REQUEST, message, param, gen_id)

    has_prompt = obj.get("prompt") is not None
    has_messages = obj.get("messages") is not None
    if has_prompt == has_messages:
        raise err('send exactly one of "prompt" (a string) and "messages" (a list of {role, content})', "prompt")
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise err('"prompt" must be a string', "prompt")
        if not prompt:
            raise err('"prompt" must not be empty', "prompt")
    else:
        messages = _messages(obj["messages"], limits, err)

    if "max_tokens" in obj and obj["max_tokens"] is not None:
        max_tokens = _int(obj, "max_tokens", limits.default_max_tokens, lo=1, hi=limits.max_tokens, id=gen_id)
    else:
        max_tokens = _int(obj, "max_length", limits.default_max_tokens, lo=1, hi=limits.max_tokens, id=gen_id)
    try:
        params = _sampling(obj, max_tokens, gen_id, limits, err)
    except InvalidParam as bad:  # well typed, but not a value that can be sampled
        raise err(bad.message, bad.param) from None
    return Generate(
        id=gen_id,
        params=params,
        prompt=prompt,
        messages=messages,
        raw=_bool(obj, "raw", err),
        truncate=_truncate(obj.get("truncate"), err),
        batch=_batch(obj.get("batch"), err),
    )


def _sampling(obj: dict[str, Any], max_tokens: int, gen_id: str | None, limits: Limits, err: Any) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(obj, "temperature", 1.0, lo=0.0, hi=10.0, id=gen_id),
        top_p=_float(obj, "top_p", 1.0, lo=0.0, hi=1.0, id=gen_id, lo_open=True),
        top_k=_int(obj, "top_k", 0, lo=0, hi=1 << 20, id=gen_id),
        min_p=_float(obj, "min_p", 0.0, lo=0.0, hi=1.0, id=gen_id),
        repetition_penalty=_float(obj, "repetition_penalty", 1.0, lo=0.0, hi=10.0, id=gen_id, lo_open=True),
        presence_penalty=_float(obj, "presence_penalty", 0.0, lo=-2.0, hi=2.0, id=gen_id),
        frequency_penalty=_float(obj, "frequency_penalty", 0.0, lo=-2.0, hi=2.0, id=gen_id),
        seed=_seed(obj, gen_id),
        stop=_stop(obj.get("stop"), limits, err),
        ignore_eos=_bool(obj, "ignore_eos", err),
    )


def _token_field(obj: dict[str, Any], name: str, what: str, limits: Limits, gen_id: str) -> str | None:
    """An optional string the server handed out (a session, a resume token), 1 to ``max_id_length`` long."""
    value = obj.get(name)
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= limits.max_id_length):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f'"{name}" must be {what} (1 to {limits.max_id_length} characters)',
            name,
            gen_id,
        )
    return value


def _optional_id(obj: dict[str, Any], limits: Limits) -> str | None:
    raw = obj.get("id")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, '"id" must be a string', "id")
    gen_id = str(raw)
    if not gen_id or len(gen_id) > limits.max_id_length:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f'"id" must be 1 to {limits.max_id_length} characters long', "id"
        )
    return gen_id


def _required_id(obj: dict[str, Any], limits: Limits) -> str:
    gen_id = _optional_id(obj, limits)
    if gen_id is None:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f'"{obj["type"]}" needs the "id" of a generation', "id")
    return gen_id


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(obj: dict[str, Any], name: str, default: int, *, lo: int, hi: int, id: str | None) -> int:
    value = obj.get(name)
    if value is None:
        return default
    if not _is_number(value) or (isinstance(value, float) and not value.is_integer()):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f'"{name}" must be an integer', name, id)
    if not lo <= value <= hi:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f'"{name}" must be between {lo} and {hi}', name, id)
    return int(value)


def _float(
    obj: dict[str, Any], name: str, default: float, *, lo: float, hi: float, id: str | None, lo_open: bool = False
) -> float:
    value = obj.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f'"{name}" must be a number', name, id)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f'"{name}" must be {bound} and at most {hi}', name, id)
    return float(value)


def _seed(obj: dict[str, Any], id: str | None) -> int | None:
    if obj.get("seed") is None:
        return None
    return _int(obj, "seed", 0, lo=0, hi=(1 << 63) - 1, id=id)


def _messages(raw: Any, limits: Limits, err: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise err('"messages" must be a non-empty list of {role, content} objects', "messages")
    if len(raw) > limits.max_messages:
        raise err(f'"messages" may hold at most {limits.max_messages} turns', "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise err(f'{where} must be an object with "role" and "content"', where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise err(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI-style content parts: text parts only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise err(f'{where}.content parts must be {{"type": "text", "text": ...}}', f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise err(f"{where}.content must be a string", f"{where}.content")
        out.append(ChatMessage(role, content))
    return tuple(out)


def _stop(raw: Any, limits: Limits, err: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise err('"stop" must be a string or a list of strings', "stop")
    if len(items) > limits.max_stop_strings:
        raise err(f'"stop" may hold at most {limits.max_stop_strings} strings', "stop")
    if any(not s or len(s) > limits.max_stop_length for s in items):
        raise err(f"each stop string must be 1 to {limits.max_stop_length} characters long", "stop")
    return tuple(items)


def _bool(obj: dict[str, Any], name: str, err: Any) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise err(f'"{name}" must be true or false', name)
    return value


def _truncate(raw: Any, err: Any) -> bool:
    if raw is None or raw is False or raw in ("none", "disabled"):
        return False
    if raw is True or raw == "auto":
        return True
    raise err('"truncate" must be "auto" or "disabled"', "truncate")


def _batch(raw: Any, err: Any) -> BatchPolicy | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise err('"batch" must be an object {"max_tokens": N, "max_ms": T}', "batch")
    n, ms = raw.get("max_tokens"), raw.get("max_ms")
    if n is None and ms is None:
        raise err('"batch" needs "max_tokens" or "max_ms" (or both)', "batch")
    if n is not None and (not _is_number(n) or n != int(n) or not 1 <= n <= 4096):
        raise err('"batch.max_tokens" must be an integer from 1 to 4096', "batch.max_tokens")
    if ms is not None and (not _is_number(ms) or not math.isfinite(ms) or not 0 <= ms <= 60_000):
        raise err('"batch.max_ms" must be a number of milliseconds from 0 to 60000', "batch.max_ms")
    return BatchPolicy(int(n) if n is not None else None, float(ms) if ms is not None else None)
