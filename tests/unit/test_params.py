"""One validator for every door: the same fields, the same ranges, the same names in errors."""

from __future__ import annotations

import pytest

from tokenwire.engine.interface import ChatMessage
from tokenwire.server.openai import protocol as oa
from tokenwire.server.realtime import protocol as rt
from tokenwire.server.requests import params
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.requests.params import FieldError, Limits
from tokenwire.server.ws.protocol import parse_generate

LIMITS = Limits()


def test_sampling_fields_become_params_with_defaults_for_the_rest() -> None:
    p = params.sampling_params({"temperature": 0.5, "stop": "x", "seed": 7, "top_k": 3}, LIMITS, 12)
    assert (p.temperature, p.stop, p.seed, p.top_k, p.max_tokens) == (0.5, ("x",), 7, 3, 12)
    assert (p.top_p, p.min_p, p.repetition_penalty, p.ignore_eos) == (1.0, 0.0, 1.0, False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"temperature": 1e-9}, "temperature"),  # typed right, but not a value that can be sampled
    ],
)
def test_every_door_refuses_the_same_value_naming_the_same_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(FieldError) as bad:
        params.sampling_params(fields, LIMITS, 1)
    assert bad.value.param == param
    with pytest.raises(RequestError) as ws:
        parse_generate({"prompt": "hi", **fields}, LIMITS)
    assert ws.value.param == param
    with pytest.raises(RequestError) as http:
        oa.parse_completion_request(
            {"messages": [{"role": "user", "content": "hi"}], **fields}, chat=True, limits=LIMITS, model_name="m"
        )
    assert (http.value.status, http.value.param) == (400, param)
    if param in rt.SAMPLING_FIELDS:
        with pytest.raises(RequestError) as realtime:
            rt.parse_response_create(None, {"input": [], **fields}, LIMITS)
        assert realtime.value.param == f"response.{param}"


def test_the_token_limit_is_read_under_each_doors_name() -> None:
    assert params.max_tokens({}, ("max_tokens",), LIMITS) == LIMITS.default_max_tokens
    assert (
        params.max_tokens(
            {"max_completion_tokens": 5, "max_tokens": 9}, ("max_completion_tokens", "max_tokens"), LIMITS
        )
        == 5
    )
    with pytest.raises(FieldError) as bad:
        params.max_tokens({"max_output_tokens": LIMITS.max_tokens + 1}, ("max_output_tokens",), LIMITS)
    assert bad.value.param == "max_output_tokens"


def test_chat_messages_take_strings_or_text_parts_and_name_the_bad_turn() -> None:
    got = params.chat_messages(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        LIMITS,
    )
    assert got == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))
    with pytest.raises(FieldError) as bad:
        params.chat_messages([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], LIMITS)
    assert bad.value.param == "messages[1].role"
    with pytest.raises(FieldError) as bad:
        params.chat_messages([{"role": "user", "content": None}], LIMITS)
    assert bad.value.param == "messages[0].content"
