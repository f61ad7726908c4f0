"""Parsing ``POST /v1/responses`` bodies and ``response.create`` events: pure, no server."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.engine.interface import ChatMessage
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.requests.params import Limits
from tokenwire.server.responses.protocol import parse_create

LIMITS = Limits()


def parse(body: dict[str, Any], websocket: bool = False) -> Any:
    return parse_create({"model": "m", **body}, LIMITS, "m", websocket=websocket)


def test_input_is_a_string_or_message_items_with_text_parts() -> None:
    assert parse({"input": "hi"}).input == (ChatMessage("user", "hi"),)
    got = parse(
        {
            "input": [
                {"type": "message", "role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
            ]
        }
    ).input
    assert got == (ChatMessage("developer", "be brief"), ChatMessage("user", "ab"), ChatMessage("assistant", "c"))


def test_fields_and_defaults() -> None:
    req = parse({"input": "hi", "max_output_tokens": 7, "temperature": 0.3, "top_p": 0.9, "instructions": "x",
                 "metadata": {"k": "v"}, "truncation": "auto", "seed": 3})  # fmt: skip
    assert (req.params.max_tokens, req.params.temperature, req.params.top_p, req.params.seed) == (7, 0.3, 0.9, 3)
    assert (req.instructions, req.metadata, req.truncate, req.store, req.background) == (
        "x",
        {"k": "v"},
        True,
        True,
        False,
    )
    assert parse({"input": "hi"}).params.max_tokens == LIMITS.default_max_tokens
    assert parse({"previous_response_id": "resp_1"}).input == ()  # continuing needs no new input


def test_websocket_mode_streams_never_runs_in_the_background_and_keeps_the_stream_id() -> None:
    req = parse({"input": "hi", "stream_id": "lane-1"}, websocket=True)
    assert (req.stream, req.background, req.stream_id) == (True, False, "lane-1")
    assert parse({"input": "hi", "stream_id": "x"}).stream_id is None  # HTTP has no lanes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": 3}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": "hi", "tools": [{"type": "file_search"}]}, "tools[0]"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "hi", "instructions": 5}, "instructions"),
        ({"input": "hi", "previous_response_id": ""}, "previous_response_id"),
        ({"input": "hi", "store": "yes"}, "store"),
        ({"input": "hi", "background": True, "store": False}, "store"),
        ({"input": "hi", "truncation": "sometimes"}, "truncation"),
        ({"input": "hi", "metadata": {"k": 1}}, "metadata"),
        ({"input": "hi", "frequency_penalty": 9}, "frequency_penalty"),
        ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "hi", "include": "reasoning.encrypted_content"}, "include"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(body)
    assert (err.value.status, err.value.param) == (400, param)


def test_include_of_what_this_server_never_makes_is_accepted() -> None:
    """No reasoning, no hosted tools, no image input: those parts never exist here, so asking for them is
    harmless; only logprobs, which every text would carry, are refused."""
    assert parse({"input": "hi", "include": ["reasoning.encrypted_content", "web_search_call.results"]}).input


def test_background_over_websocket_and_another_model_are_refused() -> None:
    with pytest.raises(RequestError) as err:
        parse({"input": "hi", "background": True}, websocket=True)
    assert err.value.param == "background"
    with pytest.raises(RequestError) as err:
        parse_create({"model": "other", "input": "hi"}, LIMITS, "m")
    assert (err.value.status, err.value.code) == (404, "model_not_found")
