"""A refused or failed request as the HTTP doors (the OpenAI and Responses APIs) answer it: OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), its HTTP status, and Retry-After where waiting helps; the
checks both APIs make of a request the same way (its JSON, its fields, its ``model``). Over errors.py's table, so
the two doors cannot disagree, and neither imports the other.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from tokenwire.server.requests import errors, params, strictjson
from tokenwire.server.requests.errors import ErrorCode


def openai_error(
    status: int, message: str, *, code: str, param: str | None = None, retry_after: float | None = None
) -> errors.RequestError:
    """A request refused in OpenAI's terms: its HTTP status and code (a wire code, or the door's own: then the wire
    code is the nearest by status)."""
    if code in ErrorCode.__members__.values():
        return errors.RequestError(ErrorCode(code), message, param, retry_after, status=status)
    nearest = ErrorCode.NOT_FOUND if status == 404 else ErrorCode.INVALID_REQUEST
    if status >= 500:
        nearest = ErrorCode.INTERNAL_ERROR
    return errors.RequestError(nearest, message, param, retry_after, status=status, name=code)


def error_body(err: errors.RequestError) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = errors.openai_type(err.wire_name, err.status)
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.wire_name}}


def retry_seconds(err: errors.RequestError) -> int | None:
    """The Retry-After header's whole seconds, where waiting helps."""
    return errors.retry_after_s(err.code, err.retry_after)


def json_input_error(err: strictjson.JSONInputError) -> errors.RequestError:
    return errors.RequestError(
        ErrorCode.INVALID_JSON if err.syntax else ErrorCode.INVALID_REQUEST, err.message, err.param
    )


def check_model(body: dict[str, Any], model_name: str, model_aliases: tuple[str, ...] = ()) -> None:
    """``model``, when given, must name the model served (or an alias): 404 ``model_not_found`` otherwise."""
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise openai_error(400, '"model" must be a string', code="invalid_request", param="model")
    if model not in (model_name, *model_aliases):
        raise openai_error(
            404,
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            code="model_not_found",
            param="model",
        )


def field_error(err: params.FieldError) -> errors.RequestError:
    return errors.RequestError(ErrorCode.INVALID_REQUEST, err.message, err.param)


def error_response(err: errors.RequestError) -> JSONResponse:
    """``err`` as an HTTP response: OpenAI's body, its status, Retry-After where waiting helps."""
    seconds = retry_seconds(err)
    headers = {"Retry-After": str(seconds)} if seconds is not None else None
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)
