"""The Python client's protocol side, without a socket: the generate message it builds, the server messages it
reads, the exception each error code raises."""

from __future__ import annotations

import pytest

from tokenwire.client import (
    FinishReason,
    InvalidRequest,
    NotFound,
    Overloaded,
    TokenwireError,
    Unauthorized,
    error_from,
)
from tokenwire.client.connection import websocket_url
from tokenwire.client.messages import (
    generate_message,
    parse_delta,
    parse_finish_reason,
    parse_hello,
    parse_timings,
    parse_usage,
    resume_message,
)


def test_generate_carries_the_prompt_and_only_the_parameters_given() -> None:
    msg = generate_message("g1", "Hi", None, {"max_tokens": 8, "temperature": 0, "seed": None, "stop": ("a", "b")})
    assert msg == {
        "type": "generate",
        "id": "g1",
        "prompt": "Hi",
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["a", "b"],
    }


def test_generate_carries_messages_as_plain_dicts() -> None:
    turns = [{"role": "user", "content": "Hi"}]
    msg = generate_message("g1", None, turns, {})
    assert msg["messages"] == turns and msg["messages"][0] is not turns[0] and "prompt" not in msg


@pytest.mark.parametrize(("prompt", "messages"), [(None, None), ("Hi", [{"role": "user", "content": "Hi"}])])
def test_exactly_one_of_prompt_and_messages_is_required(
    prompt: str | None, messages: list[dict[str, str]] | None
) -> None:
    with pytest.raises(TypeError, match="exactly one of prompt and messages"):
        generate_message("g1", prompt, messages, {})


def test_a_misspelt_parameter_is_refused_by_name_before_anything_is_sent() -> None:
    with pytest.raises(TypeError, match="'temprature'"):
        generate_message("g1", "Hi", None, {"temprature": 0.5})


def test_a_prompt_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="prompt must be a string"):
        generate_message("g1", 42, None, {})  # type: ignore[arg-type]


def test_resume_names_the_generation_its_last_seq_session_and_token() -> None:
    assert resume_message("g1", 17, "abc", "tok") == {
        "type": "resume",
        "id": "g1",
        "after_seq": 17,
        "session": "abc",
        "resume_token": "tok",
    }
    assert resume_message("g1", -1, None, None) == {"type": "resume", "id": "g1", "after_seq": -1}


def test_server_messages_become_typed_values() -> None:
    hello = parse_hello({"type": "hello", "session": "s", "model": "m", "protocol": 1, "limits": {"max_tokens": 9}})
    assert (hello.session, hello.model, hello.limits["max_tokens"]) == ("s", "m", 9)
    delta = parse_delta({"type": "tokens", "seq": 3, "content": "ab", "tokens": 2})
    assert (delta.text, delta.tokens, delta.seq) == ("ab", 2, 3)
    done = {
        "type": "complete",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cached_tokens": 0},
        "timings": {"queue_ms": 1.0, "ttft_ms": 2.5, "total_ms": 9.0, "tokens_per_second": 222.2},
    }
    assert parse_finish_reason(done) is FinishReason.LENGTH
    usage = parse_usage(done)
    assert usage is not None and usage.total_tokens == 7
    timings = parse_timings(done)
    assert timings is not None and timings.ttft_ms == 2.5
    assert parse_usage({}) is None and parse_timings({}) is None
    assert parse_finish_reason({"finish_reason": "tool_calls"}) == "tool_calls"  # a newer reason stays a string


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", InvalidRequest),
        ("not_found", NotFound),
        ("overloaded", Overloaded),
        ("unauthorized", Unauthorized),
    ],
)
def test_each_error_code_raises_its_own_class(code: str, cls: type[TokenwireError]) -> None:
    exc = error_from({"type": "error", "code": code, "content": "why", "param": "top_p", "retry_after_s": 2, "id": "g"})
    assert type(exc) is cls and exc.code == code and exc.param == "top_p" and exc.retry_after_s == 2.0
    assert exc.generation_id == "g" and str(exc) == f"{code}: why (param: top_p)"


def test_an_unknown_error_code_keeps_its_code() -> None:
    exc = error_from({"type": "error", "code": "teapot", "content": "short and stout"})
    assert type(exc) is TokenwireError and exc.code == "teapot" and exc.param is None


@pytest.mark.parametrize(
    ("given", "opened"),
    [
        ("ws://127.0.0.1:8765/ws", "ws://127.0.0.1:8765/ws"),
        ("wss://llm.example/ws", "wss://llm.example/ws"),
        ("http://127.0.0.1:8765/", "ws://127.0.0.1:8765/"),
        ("HTTPS://llm.example/chat/ws", "wss://llm.example/chat/ws"),
        (" localhost:8765 ", "ws://localhost:8765"),
    ],
)
def test_a_server_address_becomes_the_websocket_url_to_open(given: str, opened: str) -> None:
    assert websocket_url(given) == opened


@pytest.mark.parametrize("given", ["", "ftp://example.com", "http://", "ws:///ws"])
def test_an_address_that_names_no_server_is_refused_in_words(given: str) -> None:
    with pytest.raises(ValueError, match="is not a server address"):
        websocket_url(given)
