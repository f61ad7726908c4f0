"""The wire's error codes, and what each one becomes at every door: one table, so the doors cannot disagree.

The engine has its own, smaller set of reasons (:class:`tokenwire.engine.interface.EngineErrorCode`); a
server-side refusal (a rate limit, a missing key) is a :class:`RequestError`. :func:`wire_error` turns either into
the one shape the doors answer from: a code of :class:`ErrorCode`, a message, the field at fault and a retry hint.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from tokenwire.engine.interface import EngineError


class ErrorCode(enum.StrEnum):
    """Error codes of the wire protocol (PROTOCOL.md), shared by every door."""

    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TYPE = "unknown_type"
    DUPLICATE_ID = "duplicate_id"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    PROMPT_TOO_LONG = "prompt_too_long"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    SLOW_CONSUMER = "slow_consumer"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


@dataclass(slots=True, frozen=True)
class Mapping:
    """One code at the HTTP doors (status, OpenAI's error ``type``) and whether waiting may help (Retry-After)."""

    status: int
    type: str
    retry: bool = False


_INVALID = "invalid_request_error"
_SERVER = "server_error"

MAPPINGS: dict[ErrorCode, Mapping] = {
    ErrorCode.INVALID_JSON: Mapping(400, _INVALID),
    ErrorCode.INVALID_REQUEST: Mapping(400, _INVALID),
    ErrorCode.UNKNOWN_TYPE: Mapping(400, _INVALID),
    ErrorCode.DUPLICATE_ID: Mapping(400, _INVALID),
    ErrorCode.NOT_FOUND: Mapping(404, "not_found_error"),
    ErrorCode.MODEL_NOT_FOUND: Mapping(404, _INVALID),
    ErrorCode.PROMPT_TOO_LONG: Mapping(400, _INVALID),
    ErrorCode.OVERLOADED: Mapping(503, _SERVER, retry=True),
    ErrorCode.RATE_LIMITED: Mapping(429, "rate_limit_error", retry=True),
    ErrorCode.UNAUTHORIZED: Mapping(401, "authentication_error"),
    ErrorCode.SLOW_CONSUMER: Mapping(400, _INVALID),
    ErrorCode.GENERATION_FAILED: Mapping(500, _SERVER),
    ErrorCode.SHUTTING_DOWN: Mapping(503, _SERVER, retry=True),
    ErrorCode.INTERNAL_ERROR: Mapping(500, _SERVER),
}

# WebSocket close codes (RFC 6455) the doors use when an error ends the connection.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001  # the server is shutting down
POLICY_VIOLATION = 1008  # unauthorized, slow consumer, origin refused
INTERNAL_ERROR_CLOSURE = 1011
TRY_AGAIN_LATER = 1013  # connection limits


def mapping(code: ErrorCode | str) -> Mapping:
    """The HTTP status and OpenAI type of ``code``; an unknown code is a server error."""
    try:
        return MAPPINGS[ErrorCode(code)]
    except ValueError:
        return Mapping(500, _SERVER)


def http_status(code: ErrorCode | str) -> int:
    return mapping(code).status


_TYPE_BY_STATUS = {401: "authentication_error", 403: "authentication_error", 429: "rate_limit_error"}


def openai_type(code: ErrorCode | str, status: int | None = None) -> str:
    """OpenAI's error ``type`` for ``code`` (HTTP bodies, Realtime and Responses error events): the table's for a wire
    code; for a door's own code (``previous_response_not_found``, ``server_error``, ...), by the HTTP status it is
    answered with (none: a server error). The one place the type is worked out."""
    try:
        return MAPPINGS[ErrorCode(code)].type
    except ValueError:
        pass
    if status is None or status >= 500:
        return _SERVER
    if status == 404:
        return "not_found_error"
    return _TYPE_BY_STATUS.get(status, _INVALID)


def retry_after_s(code: ErrorCode | str, hint: float | None) -> int | None:
    """Whole seconds for a Retry-After header where waiting helps: the hint, else 1; None where it does not."""
    if not mapping(code).retry:
        return None
    return math.ceil(hint) if hint is not None else 1


class RequestError(Exception):
    """A request the server refuses or fails, in wire terms: the one error type of the server's doors, each of which
    renders it in its own shape (a WebSocket ``error`` message naming ``id``, the generation at fault, if any; an
    OpenAI error body with ``status``; a Realtime or Responses error event)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
        *,
        id: str | None = None,
        status: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds after which trying again may succeed
        self.id = id
        self.status = http_status(code) if status is None else status  # at the HTTP doors
        self.name = name  # a door's own, more precise code (the Responses API's previous_response_not_found)

    @property
    def wire_name(self) -> str:
        """The code a client sees: the door's own, else the wire code."""
        return self.name or self.code.value


def wire_error(err: EngineError | RequestError) -> RequestError:
    """The wire form of an engine's error (its reasons are wire codes by the same name) or a server refusal."""
    if isinstance(err, RequestError):
        return err
    return RequestError(ErrorCode(err.code.value), err.message, err.param, err.retry_after)
