"""Request fields to engine inputs, for every door: sampling parameters, chat messages, token limits.

Pure functions, no I/O. Each door calls them on its own request body (under its own field names, such as
``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``) and turns a :class:`FieldError` into its
own error shape, so all doors accept the same values and name the same fields when they refuse one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, InvalidParam, SamplingParams

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})

# The sampling fields every door spells the same way (the token limit is named per door).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
)


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


class FieldError(ValueError):
    """A request field the server cannot take as sent: ``param`` names it, ``message`` says what was expected."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def sampling_params(
    fields: Mapping[str, Any], limits: Limits, max_tokens: int, json_schema: str | None = None
) -> SamplingParams:
    """The sampling parameters named in :data:`SAMPLING_FIELDS` (absent or null: the default), checked;
    ``json_schema`` (from :func:`json_schema`) constrains the answer to JSON valid against it."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=number(fields, "temperature", 1.0, lo=0.0, hi=10.0),
            top_p=number(fields, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
            top_k=integer(fields, "top_k", 0, lo=0, hi=1 << 20),
            min_p=number(fields, "min_p", 0.0, lo=0.0, hi=1.0),
            repetition_penalty=number(fields, "repetition_penalty", 1.0, lo=0.0, hi=10.0, lo_open=True),
            presence_penalty=number(fields, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
            frequency_penalty=number(fields, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
            seed=None if fields.get("seed") is None else integer(fields, "seed", 0, lo=0, hi=(1 << 63) - 1),
            stop=stop_strings(fields.get("stop"), limits),
            ignore_eos=flag(fields, "ignore_eos"),
            json_schema=json_schema,
        )
    except InvalidParam as bad:  # well typed, but not a value that can be sampled
        raise FieldError(bad.message, bad.param) from None


MAX_SCHEMA_BYTES = 64 << 10
JSON_OBJECT = '{"type":"object"}'  # any JSON object: OpenAI's "json_object" format


def json_schema(raw: Any, param: str) -> str:
    """A JSON Schema (an object) that constrained decoding can enforce, as canonical JSON text. A schema feature
    the grammar compiler does not implement is refused naming it (its message), never silently dropped."""
    if isinstance(raw, bool) or not isinstance(raw, dict):
        raise FieldError(f"{param} must be a JSON Schema object", param)
    text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_BYTES:
        raise FieldError(f"{param} is larger than {MAX_SCHEMA_BYTES} bytes", param)
    import llguidance  # no torch: a grammar compiler (the transformers engine decodes with it too)

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # the compiler's own exception for a schema it cannot read
        raise FieldError(f"{param} is not a schema this server can enforce: {exc}", param) from None
    if is_error or messages:
        detail = "; ".join(m.strip() for m in messages) or "the grammar compiler refused it"
        raise FieldError(f"{param} is not a schema this server can enforce: {detail}", param)
    return text


def response_format(raw: Any, param: str, nested: bool) -> str | None:
    """OpenAI's output formats: ``{"type": "text"}`` (None), ``{"type": "json_object"}`` (any JSON object) or
    ``{"type": "json_schema", ...}`` with the schema under ``json_schema.schema`` (chat completions, ``nested``) or
    ``schema`` (Responses' ``text.format``). Returns the schema to enforce, if any."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        holder = raw.get("json_schema") if nested else raw
        where = f"{param}.json_schema" if nested else param
        if not isinstance(holder, dict) or "schema" not in holder:
            raise FieldError(f'{where} needs a "schema" (a JSON Schema object)', where)
        return json_schema(holder["schema"], f"{where}.schema")
    raise FieldError(
        f'{param} must be {{"type": "text"}}, {{"type": "json_object"}} or {{"type": "json_schema"}}', param
    )


def max_tokens(fields: Mapping[str, Any], names: tuple[str, ...], limits: Limits) -> int:
    """The token limit under the first of ``names`` that is set, else the server's default."""
    for name in names:
        if fields.get(name) is not None:
            return integer(fields, name, limits.default_max_tokens, lo=1, hi=limits.max_tokens)
    return limits.default_max_tokens


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(fields: Mapping[str, Any], name: str, default: int, *, lo: int, hi: int) -> int:
    value = fields.get(name)
    if value is None:
        return default
    if not is_number(value) or (isinstance(value, float) and not value.is_integer()):
        raise FieldError(f'"{name}" must be an integer', name)
    if not lo <= value <= hi:
        raise FieldError(f'"{name}" must be between {lo} and {hi}', name)
    return int(value)


def number(
    fields: Mapping[str, Any], name: str, default: float, *, lo: float, hi: float, lo_open: bool = False
) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if not is_number(value) or not math.isfinite(value):
        raise FieldError(f'"{name}" must be a number', name)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise FieldError(f'"{name}" must be {bound} and at most {hi}', name)
    return float(value)


def flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(f'"{name}" must be true or false', name)
    return value


def stop_strings(raw: Any, limits: Limits) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise FieldError('"stop" must be a string or a list of strings', "stop")
    if len(items) > limits.max_stop_strings:
        raise FieldError(f'"stop" may hold at most {limits.max_stop_strings} strings', "stop")
    if any(not s or len(s) > limits.max_stop_length for s in items):
        raise FieldError(f"each stop string must be 1 to {limits.max_stop_length} characters long", "stop")
    return tuple(items)


def text_parts(content: Any, where: str, kinds: frozenset[str] = frozenset({"text"})) -> str:
    """A message's content: a string, or a list of text parts (``{"type": "text", "text": ...}``) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
                shown = " or ".join(f'{{"type": "{k}", "text": ...}}' for k in sorted(kinds))
                raise FieldError(f"{where}.content parts must be {shown}", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise FieldError(f"{where}.content must be a string", f"{where}.content")


def chat_messages(raw: Any, limits: Limits, name: str = "messages") -> tuple[ChatMessage, ...]:
    """A non-empty list of ``{role, content}`` (content a string or text parts) as chat messages."""
    if not isinstance(raw, list) or not raw:
        raise FieldError(f'"{name}" must be a non-empty list of {{role, content}} objects', name)
    if len(raw) > limits.max_messages:
        raise FieldError(f'"{name}" may hold at most {limits.max_messages} turns', name)
    out = []
    for i, m in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise FieldError(f'{where} must be an object with "role" and "content"', where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise FieldError(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        out.append(ChatMessage(role, text_parts(m.get("content"), where)))
    return tuple(out)
