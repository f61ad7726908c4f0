"""OpenAI Realtime-compatible events for text, at ``WS /v1/realtime``: parsing and event shapes. Pure, no I/O.

The subset of OpenAI's Realtime API (GA event names) that a text model can serve: a session with instructions,
a conversation of message items, responses streamed as ``response.output_text.delta`` events, and cancel.
Audio, tools and function calls are refused with an ``error`` event naming the field, never ignored.
Sampling fields (``temperature``, ``top_p``, ``seed``, ...) in ``session`` or ``response`` are a tokenwire
extension, validated by the WebSocket protocol's own code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from tokenwire.engine.interface import ChatMessage, SamplingParams
from tokenwire.server.requests import errors, params, strictjson
from tokenwire.server.requests.params import Limits

# Sampling fields a session or a response may carry (an extension of OpenAI's events).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos")
ROLES = ("system", "user", "assistant")
TEXT_PARTS = {"user": ("input_text",), "system": ("input_text",), "assistant": ("output_text", "text")}


OWN_CODES = {  # the Realtime API's own error codes, each with the wire code it refines (all 400 but server_error)
    "unsupported": errors.ErrorCode.INVALID_REQUEST,
    "item_not_found": errors.ErrorCode.NOT_FOUND,
    "response_cancel_not_active": errors.ErrorCode.INVALID_REQUEST,
    "conversation_already_has_active_response": errors.ErrorCode.INVALID_REQUEST,
    "server_error": errors.ErrorCode.INTERNAL_ERROR,
}


def realtime_error(message: str, code: str = "invalid_request", param: str | None = None) -> errors.RequestError:
    """A client event that cannot be served, answered with an ``error`` event (the connection stays open): the
    server's one error type, with the Realtime API's own ``code`` where it has one (:data:`OWN_CODES`). Its ``id``
    is the client event at fault, once known."""
    if code in errors.ErrorCode.__members__.values():
        return errors.RequestError(errors.ErrorCode(code), message, param)
    status = 500 if code == "server_error" else 400
    wire = OWN_CODES.get(code, errors.ErrorCode.INTERNAL_ERROR if status == 500 else errors.ErrorCode.INVALID_REQUEST)
    return errors.RequestError(wire, message, param, status=status, name=code)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass(slots=True)
class Item:
    """A message of the conversation (``type: "message"``): a role and its text."""

    id: str
    role: str
    text: str
    status: str = "completed"  # in_progress while a response writes it; incomplete when cut short

    def as_dict(self) -> dict[str, Any]:
        part = "output_text" if self.role == "assistant" else "input_text"
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "status": self.status,
            "role": self.role,
            "content": [{"type": part, "text": self.text}],
        }


@dataclass(slots=True, frozen=True)
class Session:
    """What every response of a connection starts from; ``session.update`` changes it."""

    model: str
    instructions: str = ""
    max_output_tokens: int | None = None  # None: "inf" (up to the server's limit)
    sampling: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: new_id("sess"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": self.instructions,
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            "tools": [],
            "tool_choice": "none",
            **self.sampling,
        }


@dataclass(slots=True, frozen=True)
class SessionUpdate:
    event_id: str | None
    session: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ItemCreate:
    event_id: str | None
    item: Item
    previous_item_id: str | None = None


@dataclass(slots=True, frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(slots=True, frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(slots=True, frozen=True)
class ResponseCreate:
    event_id: str | None
    instructions: str | None = None
    max_output_tokens: int | str | None = "session"  # "session": as the session says
    use_conversation: bool = True
    input: tuple[Item, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None


@dataclass(slots=True, frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None = None


ClientEvent = SessionUpdate | ItemCreate | ItemDelete | ItemRetrieve | ResponseCreate | ResponseCancel

_AUDIO_EVENTS = (
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "output_audio_buffer.clear",
    "conversation.item.truncate",
)


def parse_event(data: str | bytes, limits: Limits) -> ClientEvent:
    """One client frame to a typed event. Raises :func:`realtime_error`'s error naming what is wrong."""
    try:
        obj = strictjson.loads(data, "the event")
    except strictjson.JSONInputError as err:
        raise realtime_error(err.message, "invalid_json" if err.syntax else "invalid_request", err.param) from None
    if not isinstance(obj, dict):
        raise realtime_error('an event must be a JSON object with a "type"', "invalid_json")
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
    try:
        return _parse_object(obj, event_id, limits)
    except errors.RequestError as err:
        err.id = event_id
        raise


def _parse_object(obj: dict[str, Any], event_id: str | None, limits: Limits) -> ClientEvent:
    kind = obj.get("type")
    if kind == "session.update":
        session = _object(obj, "session")
        return SessionUpdate(event_id, session)
    if kind == "conversation.item.create":
        previous = obj.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise realtime_error('"previous_item_id" must be a string', param="previous_item_id")
        return ItemCreate(event_id, parse_item(_object(obj, "item"), "item"), previous)
    if kind in ("conversation.item.delete", "conversation.item.retrieve"):
        item_id = obj.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise realtime_error(f'"{kind}" needs an "item_id"', param="item_id")
        return ItemDelete(event_id, item_id) if kind.endswith("delete") else ItemRetrieve(event_id, item_id)
    if kind == "response.create":
        return parse_response_create(event_id, obj.get("response") or {}, limits)
    if kind == "response.cancel":
        rid = obj.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise realtime_error('"response_id" must be a string', param="response_id")
        return ResponseCancel(event_id, rid)
    if kind in _AUDIO_EVENTS:
        raise realtime_error(f'"{kind}" needs audio, which this text-only server does not support', "unsupported")
    shown = kind if isinstance(kind, str) and len(kind) <= 60 else "?"
    raise realtime_error(f"unknown event type {shown!r}", "unknown_type", "type")


def _object(obj: dict[str, Any], name: str) -> dict[str, Any]:
    value = obj.get(name)
    if not isinstance(value, dict):
        raise realtime_error(f'"{name}" must be an object', param=name)
    return value


def parse_item(raw: dict[str, Any], where: str) -> Item:
    kind = raw.get("type", "message")
    if kind != "message":
        raise realtime_error(
            f'{where}.type {kind!r} is not supported: only "message" items (no function calls)',
            "unsupported",
            f"{where}.type",
        )
    role = raw.get("role")
    if role not in ROLES:
        raise realtime_error(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
    content = raw.get("content")
    if not isinstance(content, list):
        raise realtime_error(f"{where}.content must be a list of parts", param=f"{where}.content")
    texts = []
    for i, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype not in TEXT_PARTS[role] or not isinstance(part.get("text"), str):
            expected = " or ".join(f'{{"type": "{t}", "text": ...}}' for t in TEXT_PARTS[role])
            raise realtime_error(
                f"{where}.content[{i}] must be {expected} (audio and images are not supported)",
                "unsupported"
                if ptype in ("input_audio", "input_image", "output_audio", "audio")
                else "invalid_request",
                f"{where}.content[{i}]",
            )
        texts.append(part["text"])
    item_id = raw.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise realtime_error(f"{where}.id must be a string of 1 to 64 characters", param=f"{where}.id")
    return Item(item_id or new_id("item"), role, "".join(texts))


def _max_output_tokens(raw: Any, limits: Limits, param: str) -> int | None:
    if raw == "inf" or raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= limits.max_tokens:
        raise realtime_error(f'{param} must be "inf" or an integer from 1 to {limits.max_tokens}', param=param)
    return raw


def sampling_of(raw: dict[str, Any], limits: Limits, where: str) -> dict[str, Any]:
    """The sampling fields of a session or response, checked by the WebSocket protocol's parser."""
    fields = {k: raw[k] for k in SAMPLING_FIELDS if k in raw}
    try:
        params.sampling_params(fields, limits, 1)
    except params.FieldError as err:
        raise realtime_error(err.message, param=f"{where}.{err.param}") from None
    return fields


def _refuse_unsupported(raw: dict[str, Any], where: str) -> None:
    modalities = raw.get("output_modalities", raw.get("modalities"))
    if modalities is not None and modalities != ["text"]:
        raise realtime_error(
            f'{where}.output_modalities must be ["text"]: this server has no audio', "unsupported", where
        )
    if raw.get("tools") not in (None, []):
        raise realtime_error(f"{where}.tools is not supported by this server", "unsupported", f"{where}.tools")
    if raw.get("audio") not in (None, {}):
        raise realtime_error(f"{where}.audio is not supported by this server", "unsupported", f"{where}.audio")


def update_session(session: Session, raw: dict[str, Any], limits: Limits) -> Session:
    """``session.update``: the fields given replace the session's; the others stay."""
    _refuse_unsupported(raw, "session")
    kind = raw.get("type", "realtime")
    if kind != "realtime":
        raise realtime_error(
            'session.type must be "realtime" (transcription sessions need audio)', param="session.type"
        )
    changes: dict[str, Any] = {}
    if "instructions" in raw:
        if not isinstance(raw["instructions"], str):
            raise realtime_error("session.instructions must be a string", param="session.instructions")
        changes["instructions"] = raw["instructions"]
    if "max_output_tokens" in raw:
        changes["max_output_tokens"] = _max_output_tokens(raw["max_output_tokens"], limits, "session.max_output_tokens")
    sampling = sampling_of(raw, limits, "session")
    if sampling:
        changes["sampling"] = {**session.sampling, **sampling}
    return replace(session, **changes)


def parse_response_create(event_id: str | None, raw: Any, limits: Limits) -> ResponseCreate:
    if not isinstance(raw, dict):
        raise realtime_error('"response" must be an object', param="response")
    _refuse_unsupported(raw, "response")
    instructions = raw.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise realtime_error("response.instructions must be a string", param="response.instructions")
    conversation = raw.get("conversation", "auto")
    if conversation not in ("auto", "none"):
        raise realtime_error('response.conversation must be "auto" or "none"', param="response.conversation")
    items = raw.get("input")
    parsed: tuple[Item, ...] | None = None
    if items is not None:
        if not isinstance(items, list) or len(items) > limits.max_messages:
            raise realtime_error(
                f"response.input must be a list of at most {limits.max_messages} items", param="response.input"
            )
        parsed = tuple(
            parse_item(it if isinstance(it, dict) else {}, f"response.input[{i}]") for i, it in enumerate(items)
        )
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise realtime_error("response.metadata must be an object", param="response.metadata")
    max_tokens: int | str | None = "session"
    if "max_output_tokens" in raw:
        max_tokens = _max_output_tokens(raw["max_output_tokens"], limits, "response.max_output_tokens")
    return ResponseCreate(
        event_id,
        instructions=instructions,
        max_output_tokens=max_tokens,
        use_conversation=conversation == "auto",
        input=parsed,
        sampling=sampling_of(raw, limits, "response"),
        metadata=metadata,
    )


def build_request(
    session: Session, create: ResponseCreate, conversation: list[Item], limits: Limits
) -> tuple[tuple[ChatMessage, ...], SamplingParams]:
    """The chat messages and sampling parameters of one response."""
    instructions = create.instructions if create.instructions is not None else session.instructions
    items = list(conversation) if create.use_conversation else []
    if create.input is not None:
        items += create.input
    messages = [ChatMessage("system", instructions)] if instructions else []
    messages += [ChatMessage(it.role, it.text) for it in items]
    if not any(m.role != "system" for m in messages):
        raise realtime_error(
            "the response has no input: add a conversation item first, or give response.input", param="response"
        )
    chosen = create.max_output_tokens
    max_tokens = session.max_output_tokens if chosen == "session" or isinstance(chosen, str) else chosen
    fields = {**session.sampling, **create.sampling}
    return tuple(messages), params.sampling_params(fields, limits, max_tokens or limits.max_tokens)


# -- server events


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(err: errors.RequestError, client_event_id: str | None) -> dict[str, Any]:
    """The ``error`` event of ``err``: its code (the Realtime API's own where it has one) and OpenAI's error type for
    it (errors.py, the one place it is worked out)."""
    return event(
        "error",
        error={
            "type": errors.openai_type(err.wire_name, err.status),
            "code": err.wire_name,
            "message": err.message,
            "param": err.param,
            "event_id": err.id or client_event_id,
        },
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "total_tokens": prompt_tokens + completion_tokens,
        "input_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": 0, "cached_tokens": cached_tokens},
        "output_token_details": {"text_tokens": completion_tokens, "audio_tokens": 0},
    }
