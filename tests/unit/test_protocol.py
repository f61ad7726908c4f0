"""Client message parsing, without sockets: every class of bad input gets its documented error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.requests.params import Limits
from tokenwire.server.ws.protocol import BatchPolicy, Cancel, Generate, Ping, Pong, Resume, parse_message

LIMITS = Limits()


def parse(obj: Any) -> Any:
    return parse_message(obj if isinstance(obj, str | bytes) else json.dumps(obj), LIMITS)


def error_of(obj: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(obj)
    return info.value


def test_tutorial_client_message_is_a_generate_with_max_length_as_max_tokens() -> None:
    msg = parse({"type": "generate", "prompt": "Hi there", "max_length": 100})
    assert isinstance(msg, Generate)
    assert msg.prompt == "Hi there" and msg.messages is None and msg.id is None
    assert msg.params.max_tokens == 100


def test_full_generate_is_parsed_into_typed_fields() -> None:
    msg = parse(
        {
            "type": "generate",
            "id": "g1",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 20,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": 7,
            "stop": ["\n\n", "END"],
            "batch": {"max_tokens": 4, "max_ms": 50},
            "truncate": "auto",
            "ignore_eos": True,
            "unknown_field": "is ignored",
        }
    )
    assert isinstance(msg, Generate)
    p = msg.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (20, 0.0, 0.9, 40, 0.05)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.seed) == (1.1, 0.5, -0.5, 7)
    assert p.stop == ("\n\n", "END") and p.greedy and p.ignore_eos
    assert msg.batch == BatchPolicy(4, 50.0)
    assert msg.truncate and msg.messages is not None and msg.messages[0].role == "system"


def test_stop_as_a_single_string() -> None:
    assert parse({"type": "generate", "prompt": "x", "stop": "END"}).params.stop == ("END",)


def test_openai_style_content_parts_are_joined() -> None:
    msg = parse({"type": "generate", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
    assert msg.messages[0].content == "a"


def test_other_message_types() -> None:
    assert parse({"type": "cancel", "id": "g1"}) == Cancel("g1")
    assert parse({"type": "ping", "ts": 123}) == Ping(123)
    assert parse({"type": "pong"}) == Pong()
    assert parse({"type": "resume", "id": "g1", "after_seq": 4}) == Resume("g1", 4)
    assert parse({"type": "resume", "id": "g1"}) == Resume("g1", -1)  # from the start: started included
    assert parse({"type": "resume", "id": "g1", "after_seq": 0, "session": "ab12"}) == Resume("g1", 0, "ab12")


@pytest.mark.parametrize("raw", ["not json", "{", "", b"\xff\xfe", "[1, 2]", "42", '"generate"', "NaN"])
def test_non_json_or_non_object_is_invalid_json(raw: Any) -> None:
    assert error_of(raw).code is ErrorCode.INVALID_JSON


def test_nan_inside_an_object_is_rejected() -> None:
    assert error_of('{"type": "generate", "prompt": "x", "temperature": NaN}').code is ErrorCode.INVALID_JSON


def test_binary_frame_with_json_is_accepted() -> None:
    assert isinstance(parse(b'{"type": "ping"}'), Ping)


def test_unknown_type() -> None:
    err = error_of({"type": "explode"})
    assert err.code is ErrorCode.UNKNOWN_TYPE and "explode" in err.message


@pytest.mark.parametrize("obj", [{}, {"type": 5}, {"type": None}])
def test_missing_or_non_string_type_is_invalid_request(obj: dict[str, Any]) -> None:
    err = error_of(obj)
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == "type"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "prompt"),  # neither prompt nor messages
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "100"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_length": 0}, "max_length"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": 1e9}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "min_p": 2}, "min_p"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["x"] * 100}, "stop"),
        ({"prompt": "x", "batch": 5}, "batch"),
        ({"prompt": "x", "batch": {}}, "batch"),
        ({"prompt": "x", "batch": {"max_tokens": 0}}, "batch.max_tokens"),
        ({"prompt": "x", "batch": {"max_ms": -1}}, "batch.max_ms"),
        ({"prompt": "x", "raw": "yes"}, "raw"),
        ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
        ({"prompt": "x", "truncate": "sometimes"}, "truncate"),
        ({"prompt": "x", "id": ""}, "id"),
        ({"prompt": "x", "id": "x" * 1000}, "id"),
        ({"prompt": "x", "id": {"a": 1}}, "id"),
    ],
)
def test_invalid_generate_fields_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    err = error_of({"type": "generate", **fields})
    assert err.code is ErrorCode.INVALID_REQUEST
    assert err.param == param
    assert err.message  # a human sentence


def test_invalid_request_carries_the_generation_id() -> None:
    err = error_of({"type": "generate", "id": "g9", "prompt": "x", "top_p": 7})
    assert err.id == "g9"


def test_cancel_without_id_is_invalid() -> None:
    err = error_of({"type": "cancel"})
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == "id"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "id"),
        ({"id": "g", "after_seq": -2}, "after_seq"),
        ({"id": "g", "after_seq": 1.5}, "after_seq"),
        ({"id": "g", "after_seq": "3"}, "after_seq"),
        ({"id": "g", "session": 7}, "session"),
        ({"id": "g", "session": ""}, "session"),
        ({"id": "g", "resume_token": 5}, "resume_token"),
        ({"id": "g", "resume_token": "x" * 1000}, "resume_token"),
    ],
)
def test_invalid_resume_fields_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    err = error_of({"type": "resume", **fields})
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == param


def test_numeric_id_is_accepted_as_a_string() -> None:
    assert parse({"type": "generate", "prompt": "x", "id": 5}).id == "5"


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    """Nesting deeper than the parser (or than MAX_DEPTH) is refused; a ping whose ts nests 970 levels, which the
    parser accepts, is refused too, naming ts (it once crashed the handler while echoing it)."""
    err = error_of("[" * 100000 + "]" * 100000)
    assert err.code is ErrorCode.INVALID_REQUEST and "nested" in err.message
    err = error_of('{"type": "ping", "ts": ' + "[" * 970 + "]" * 970 + "}")
    assert err.code is ErrorCode.INVALID_REQUEST and "nested" in err.message
    err = error_of('{"type": "ping", "ts": ' + "[" * 40 + "]" * 40 + "}")  # within the parser's reach: named
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == "ts" and '"ts"' in err.message
    assert isinstance(parse({"type": "ping", "ts": [[[1]]]}), Ping)


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ('{"type": "generate", "prompt": "x", "temperature": ' + "9" * 4000 + "}", "temperature"),
        ('{"type": "generate", "prompt": "x", "top_k": ' + "9" * 5000 + "}", "top_k"),
        ('{"type": "generate", "prompt": "x", "top_p": 1e999}', "top_p"),
        ('{"type": "generate", "prompt": "x", "batch": {"max_tokens": 1e999}}', "batch.max_tokens"),
        ('{"type": "generate", "prompt": "x", "batch": {"max_ms": -1e999}}', "batch.max_ms"),
        ('{"type": "generate", "prompt": "x", "seed": ' + "1" * 350 + "}", "seed"),
        ('{"type": "ping", "ts": 1e999}', "ts"),
        ('{"type": "resume", "id": "g", "after_seq": 1e400}', "after_seq"),
    ],
)
def test_numbers_python_cannot_convert_are_invalid_requests_naming_the_field(text: str, param: str) -> None:
    """JSON numbers have no range, but a field does: 1e999 (inf to Python), a 4,000-digit integer (no float holds
    it) are refused naming the field, never raised as a crash."""
    err = error_of(text)
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == param and "out of range" in err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 1e-5}, "temperature"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ],
)
def test_values_that_cannot_be_sampled_are_refused_naming_the_parameter(fields: dict[str, Any], param: str) -> None:
    """Well typed but not samplable: dividing logits by 1e-300 gives inf, and the softmax NaN; such a request once
    failed every generation sharing its step."""
    err = error_of({"type": "generate", "prompt": "x", **fields})
    assert err.code is ErrorCode.INVALID_REQUEST and err.param == param, err.message
    assert param in err.message


def test_the_smallest_samplable_values_are_accepted() -> None:
    msg = parse({"type": "generate", "prompt": "x", "temperature": 0.001, "repetition_penalty": 0.01})
    assert isinstance(msg, Generate) and msg.params.temperature == 0.001


def test_a_lone_surrogate_escape_is_refused_naming_the_field() -> None:
    err = error_of('{"type": "generate", "prompt": "hi \\ud800 there"}')
    assert err.code is ErrorCode.INVALID_JSON and '"prompt"' in err.message and "surrogate" in err.message
    err = error_of('{"type": "generate", "messages": [{"role": "user", "content": "\\udfff"}]}')
    assert err.code is ErrorCode.INVALID_JSON
    err = error_of('{"type": "cancel", "id": "\\ud83d"}')
    assert err.code is ErrorCode.INVALID_JSON
    # a proper pair of escapes is one valid character
    assert parse('{"type": "generate", "prompt": "\\ud83d\\ude00"}').prompt == "😀"
