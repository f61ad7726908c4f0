"""Realtime events without sockets: parsing, session updates, and what a response sends to the engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenwire.server.realtime.protocol import (
    Item,
    ItemCreate,
    ResponseCancel,
    ResponseCreate,
    Session,
    build_request,
    parse_event,
    update_session,
)
from tokenwire.server.requests.errors import RequestError
from tokenwire.server.requests.params import Limits

LIMITS = Limits()


def parse(obj: dict[str, Any]) -> Any:
    return parse_event(json.dumps(obj), LIMITS)


def error_of(obj: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(obj)
    return info.value


def test_an_item_joins_its_text_parts_and_gets_an_id() -> None:
    ev = parse(
        {
            "type": "conversation.item.create",
            "event_id": "e1",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello "}, {"type": "input_text", "text": "there"}],
            },
        }
    )
    assert isinstance(ev, ItemCreate) and ev.event_id == "e1"
    assert ev.item.role == "user" and ev.item.text == "Hello there" and ev.item.id.startswith("item_")
    assert ev.item.as_dict()["content"] == [{"type": "input_text", "text": "Hello there"}]


def test_an_assistant_item_takes_output_text_and_a_user_item_does_not() -> None:
    ok = parse(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
        }
    )
    assert ok.item.as_dict()["content"] == [{"type": "output_text", "text": "Hi"}]
    err = error_of(
        {
            "type": "conversation.item.create",
            "event_id": "e2",
            "item": {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "Hi"}]},
        }
    )
    assert err.param == "item.content[0]" and err.id == "e2" and "input_text" in err.message


def test_session_update_changes_only_what_it_names() -> None:
    s = Session(model="m")
    s = update_session(s, {"instructions": "Be kind.", "temperature": 0.2}, LIMITS)
    s = update_session(s, {"max_output_tokens": 50, "seed": 1}, LIMITS)
    assert (s.instructions, s.max_output_tokens, s.sampling) == ("Be kind.", 50, {"temperature": 0.2, "seed": 1})
    assert update_session(s, {"max_output_tokens": "inf"}, LIMITS).max_output_tokens is None
    assert s.as_dict()["output_modalities"] == ["text"] and s.as_dict()["max_output_tokens"] == 50
    with pytest.raises(RequestError) as info:
        update_session(s, {"max_output_tokens": LIMITS.max_tokens + 1}, LIMITS)
    assert info.value.param == "session.max_output_tokens"


def test_a_response_uses_its_own_instructions_and_limits_over_the_sessions() -> None:
    session = Session(model="m", instructions="Session rules.", max_output_tokens=40, sampling={"temperature": 0.5})
    talk = [Item("a", "user", "Q1"), Item("b", "assistant", "A1"), Item("c", "user", "Q2")]
    default = parse({"type": "response.create"})
    assert isinstance(default, ResponseCreate)
    messages, params = build_request(session, default, talk, LIMITS)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Session rules."),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
    ]
    assert params.max_tokens == 40 and params.temperature == 0.5
    own = parse(
        {"type": "response.create", "response": {"instructions": "", "max_output_tokens": "inf", "temperature": 0}}
    )
    messages, params = build_request(session, own, talk, LIMITS)
    assert messages[0].role == "user"  # empty instructions: no system message
    assert params.max_tokens == LIMITS.max_tokens and params.temperature == 0


def test_cancel_and_unknown_and_audio_events() -> None:
    assert parse({"type": "response.cancel", "response_id": "resp_1"}) == ResponseCancel(None, "resp_1")
    assert error_of({"type": "nope"}).wire_name == "unknown_type"
    assert error_of({"type": "input_audio_buffer.commit"}).wire_name == "unsupported"
    with pytest.raises(RequestError) as info:
        parse_event("[1]", LIMITS)
    assert info.value.wire_name == "invalid_json"
    with pytest.raises(RequestError) as info:
        parse_event('{"type": "session.update", "session": {"instructions": "\\ud800"}}', LIMITS)
    assert info.value.wire_name == "invalid_json"
