"""The tool-call fallback: parsing tools and choices, the forced call's schema, and reading a call as it streams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenwire.server.requests import tools
from tokenwire.server.requests.params import FieldError
from tokenwire.server.requests.tools import CallStream, Tool, ToolChoice

WEATHER = Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})
TOOLS = (WEATHER, Tool("get_time", "", {"type": "object"}))


def stream(text: str, step: int) -> tuple[list[tuple[str, str]], CallStream]:
    cs = CallStream(TOOLS)
    out: list[tuple[str, str]] = []
    for i in range(0, len(text), step):
        out += cs.feed(text[i : i + step])
    out += cs.finish()
    return out, cs


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_call_streams_its_name_then_its_arguments_whatever_the_deltas(step: int) -> None:
    text = '{ "name" : "get_weather",\n "arguments": {"city": "Pa}r\\"is", "n": [1, {"a": 2}]} }'
    out, cs = stream(text, step)
    assert out[0] == ("name", "get_weather") and all(kind == "arguments" for kind, _ in out[1:])
    arguments = "".join(piece for _, piece in out[1:])
    assert json.loads(arguments) == {"city": 'Pa}r"is', "n": [1, {"a": 2}]}
    call = cs.call()
    assert call is not None and call.arguments == arguments and call.id == cs.call_id and call.id.startswith("call_")


@pytest.mark.parametrize(
    "text",
    ["Hello {", '{"nam": 1}', '{"name": "unknown_tool", "arguments": {}}', "  plain", '{"name": "get_weather"}'],
)
def test_an_answer_that_is_not_a_call_to_a_known_tool_comes_out_whole_as_text(text: str) -> None:
    for step in (1, 3, 1000):
        out, cs = stream(text, step)
        assert all(kind == "text" for kind, _ in out) and "".join(p for _, p in out) == text
        assert cs.call() is None


def test_parse_call_takes_a_whole_call_only() -> None:
    call = tools.parse_call(' {"name": "get_time", "parameters": {}} ', TOOLS)
    assert call is not None and (call.name, call.arguments) == ("get_time", "{}")
    assert tools.parse_call('{"name": "get_time", "arguments": {', TOOLS) is None
    assert tools.parse_call("sure", TOOLS) is None


def test_the_forced_call_schema_allows_only_the_chosen_tools() -> None:
    one = json.loads(tools.call_schema(TOOLS, ToolChoice("function", "get_weather")))
    assert one["properties"]["name"] == {"const": "get_weather"} and one["required"] == ["name", "arguments"]
    both = json.loads(tools.call_schema(TOOLS, ToolChoice("required")))
    assert [v["properties"]["name"]["const"] for v in both["anyOf"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
        ([{"type": "web_search"}], "tools[0]"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_are_named(raw: Any, param: str) -> None:
    with pytest.raises(FieldError) as err:
        tools.parse_tools(raw, nested=True)
    assert err.value.param == param


def test_choices() -> None:
    assert tools.parse_choice(None, TOOLS, nested=True) == ToolChoice("auto")
    assert tools.parse_choice(None, (), nested=True) == ToolChoice("none")
    assert tools.parse_choice({"type": "function", "name": "get_time"}, TOOLS, nested=False) == ToolChoice(
        "function", "get_time"
    )
    with pytest.raises(FieldError):
        tools.parse_choice("required", (), nested=True)
    assert "Call the tool get_time now." in tools.system_text(TOOLS, ToolChoice("function", "get_time"))


def test_a_call_wrapped_in_a_templates_tool_call_tags_is_a_call() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    out, cs = stream(text, 3)
    assert out[0] == ("name", "get_time") and cs.call() is not None and cs.call().arguments == "{}"  # type: ignore[union-attr]
    call = tools.parse_call(text, TOOLS)
    assert call is not None and call.name == "get_time"
    text_out, _ = stream("<b>bold</b>", 2)
    assert "".join(p for _, p in text_out) == "<b>bold</b>"
