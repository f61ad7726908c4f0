"""Property-based tests of every door's parser (hypothesis): whatever a client sends, the parser returns a typed
message or raises its own typed error with a sentence, never anything else; and what it accepts keeps its values."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenwire.server.openai import protocol as oa
from tokenwire.server.realtime import protocol as rt
from tokenwire.server.requests import http_errors
from tokenwire.server.requests.errors import ErrorCode, RequestError
from tokenwire.server.requests.params import Limits
from tokenwire.server.ws.protocol import Generate, parse_message

LIMITS = Limits()
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values, including the awkward ones: huge and negative numbers, floats at the edges, unicode, nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)

WS_FIELDS = [
    "type",
    "id",
    "prompt",
    "messages",
    "max_tokens",
    "max_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "raw",
    "truncate",
    "batch",
    "after_seq",
    "session",
    "resume_token",
    "ignore_eos",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ts",
]
ws_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "cancel", "ping", "pong", "resume", "nope"]) | st.text(max_size=8)},
    optional={name: json_values for name in WS_FIELDS[1:]},
)


def ws_outcome(data: str | bytes) -> Any:
    try:
        return parse_message(data, LIMITS)
    except RequestError as err:
        assert isinstance(err.code, ErrorCode) and err.message and isinstance(err.message, str)
        assert err.param is None or isinstance(err.param, str)
        return err


@PROPERTY
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_frame_is_a_message_or_a_protocol_error(data: str | bytes) -> None:
    ws_outcome(data)


@PROPERTY
@given(ws_objects)
def test_any_object_with_protocol_fields_is_a_message_or_a_protocol_error_naming_a_field(obj: dict[str, Any]) -> None:
    out = ws_outcome(json.dumps(obj))
    if isinstance(out, RequestError) and out.code is ErrorCode.INVALID_REQUEST and out.param is not None:
        head = out.param.split("[")[0].split(".")[0]
        assert head in WS_FIELDS, out.param  # the field it names is one the client sent or must send


@PROPERTY
@given(
    prompt=st.text(min_size=1, max_size=100),
    max_tokens=st.integers(min_value=1, max_value=LIMITS.max_tokens),
    temperature=st.floats(min_value=0.001, max_value=2.0),
    top_p=st.floats(min_value=0.01, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**62),
)
def test_a_valid_generate_keeps_its_values(
    prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int
) -> None:
    frame = {
        "type": "generate",
        "id": "g",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    msg = parse_message(json.dumps(frame), LIMITS)
    assert isinstance(msg, Generate)
    assert msg.prompt == prompt and msg.id == "g"
    p = msg.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (max_tokens, temperature, top_p, seed)


OPENAI_FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "tools",
    "response_format",
    "logprobs",
]
openai_bodies = st.fixed_dictionaries({}, optional={name: json_values for name in OPENAI_FIELDS}) | json_values


@PROPERTY
@given(openai_bodies, st.booleans())
def test_any_openai_body_is_a_request_or_an_api_error_with_a_client_status(body: Any, chat: bool) -> None:
    try:
        req = oa.parse_completion_request(body, chat=chat, limits=LIMITS, model_name="m")
    except RequestError as err:
        assert 400 <= err.status < 500 and http_errors.error_body(err)["error"]["message"]
        return
    assert req.generate.params.max_tokens >= 1


REALTIME_TYPES = [
    "session.update",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
    "input_audio_buffer.append",
    "unknown.event",
]
realtime_events = st.fixed_dictionaries(
    {"type": st.sampled_from(REALTIME_TYPES) | st.text(max_size=10)},
    optional={
        "event_id": json_values,
        "session": json_values,
        "item": json_values,
        "item_id": json_values,
        "response": json_values,
        "response_id": json_values,
        "previous_item_id": json_values,
    },
)


@PROPERTY
@given(realtime_events | json_values)
def test_any_realtime_event_is_an_event_or_a_realtime_error(obj: Any) -> None:
    try:
        rt.parse_event(json.dumps(obj), LIMITS)
    except RequestError as err:
        assert err.message and isinstance(err.code, str)


@PROPERTY
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_realtime_frame_is_an_event_or_a_realtime_error(data: str | bytes) -> None:
    try:
        rt.parse_event(data, LIMITS)
    except RequestError as err:
        assert err.message
