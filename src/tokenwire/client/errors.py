"""One exception class per error code of the protocol (docs/protocol.md), and the client's own: a connection
that could not be made or kept.

Catch :class:`TokenwireError` for all of them, or a subclass for one case::

    try:
        text = await gen.text()
    except Overloaded as exc:
        await asyncio.sleep(exc.retry_after_s or 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenwire.client.messages import number


class TokenwireError(Exception):
    """An ``error`` message from the server, or a failure of the connection (``code`` says which)."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        generation_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param  # the request field at fault, when there is one ("temperature", "messages[2].role")
        self.retry_after_s = retry_after_s  # when trying again later may succeed
        self.generation_id = generation_id

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.code}: {self.message}{where}"


class InvalidJSON(TokenwireError):
    code = "invalid_json"


class InvalidRequest(TokenwireError):
    """A field is missing, of the wrong type or out of range; ``param`` names it."""

    code = "invalid_request"


class UnknownType(TokenwireError):
    code = "unknown_type"


class DuplicateId(TokenwireError):
    code = "duplicate_id"


class NotFound(TokenwireError):
    """A cancel or resume of a generation the server does not have (any more)."""

    code = "not_found"


class PromptTooLong(TokenwireError):
    code = "prompt_too_long"


class RateLimited(TokenwireError):
    code = "rate_limited"


class Overloaded(TokenwireError):
    """Too many requests waiting, the model still loading, or no place for another connection."""

    code = "overloaded"


class Unauthorized(TokenwireError):
    """The server wants an API key, and this client sent none or a wrong one."""

    code = "unauthorized"


class SlowConsumer(TokenwireError):
    code = "slow_consumer"


class GenerationFailed(TokenwireError):
    code = "generation_failed"


class ShuttingDown(TokenwireError):
    code = "shutting_down"


class InternalError(TokenwireError):
    code = "internal_error"


class ConnectionFailed(TokenwireError):
    """The client could not connect, or lost the connection and could not get it back (and with it, the
    generations that were running) within its reconnect time."""

    code = "connection_failed"


_BY_CODE: dict[str, type[TokenwireError]] = {
    cls.code: cls
    for cls in (
        InvalidJSON,
        InvalidRequest,
        UnknownType,
        DuplicateId,
        NotFound,
        PromptTooLong,
        RateLimited,
        Overloaded,
        Unauthorized,
        SlowConsumer,
        GenerationFailed,
        ShuttingDown,
        InternalError,
        ConnectionFailed,
    )
}


def error_from(message: Mapping[str, Any]) -> TokenwireError:
    """The exception for a server ``error`` message: its code's class (a code this client does not know yet
    gives the base class, with that code)."""
    code = str(message.get("code") or "error")
    content = str(message.get("content") or message.get("message") or code)
    param = message.get("param")
    retry = message.get("retry_after_s")
    gen_id = message.get("id")
    cls = _BY_CODE.get(code, TokenwireError)
    return cls(
        content,
        code=code,
        param=str(param) if param is not None else None,
        retry_after_s=number(retry),
        generation_id=str(gen_id) if gen_id is not None else None,
    )
