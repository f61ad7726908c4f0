"""The wire's error table: every code has one meaning at every door, and every engine reason is a wire code."""

from __future__ import annotations

import pytest

from tokenwire.engine.interface import EngineError, EngineErrorCode
from tokenwire.server.requests import errors, http_errors
from tokenwire.server.requests.errors import ErrorCode, RequestError, wire_error


def test_every_wire_code_has_a_status_and_a_type() -> None:
    assert set(errors.MAPPINGS) == set(ErrorCode)
    for code in ErrorCode:
        assert errors.http_status(code) in (400, 401, 404, 429, 500, 503)
        assert errors.openai_type(code).endswith("_error")


def test_every_engine_reason_is_a_wire_code_of_the_same_name() -> None:
    for reason in EngineErrorCode:
        wire = wire_error(EngineError(reason, "why", "field", 2.5))
        assert wire.code is ErrorCode(reason.value)
        assert (wire.message, wire.param, wire.retry_after) == ("why", "field", 2.5)


@pytest.mark.parametrize(
    ("code", "status", "retry"),
    [
        (ErrorCode.INVALID_REQUEST, 400, None),
        (ErrorCode.UNAUTHORIZED, 401, None),
        (ErrorCode.RATE_LIMITED, 429, 3),
        (ErrorCode.OVERLOADED, 503, 3),
        (ErrorCode.SHUTTING_DOWN, 503, 3),
        (ErrorCode.GENERATION_FAILED, 500, None),
    ],
)
def test_http_doors_answer_from_the_table(code: ErrorCode, status: int, retry: int | None) -> None:
    err = errors.wire_error(RequestError(code, "no", retry_after=2.2))
    assert (err.status, http_errors.retry_seconds(err), err.code) == (status, retry, code.value)
    assert http_errors.error_body(err)["error"]["type"] == errors.openai_type(code)


def test_retry_after_defaults_to_one_second_where_waiting_helps() -> None:
    assert errors.retry_after_s(ErrorCode.OVERLOADED, None) == 1
    assert errors.retry_after_s(ErrorCode.INVALID_REQUEST, 5.0) is None
    assert errors.http_status("not_a_code") == 500
