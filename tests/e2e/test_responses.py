"""The Responses API (``/v1/responses`` over SSE and WebSocket) with the official ``openai`` package as the client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.server import RunningServer


@pytest.fixture
def oai(tiny_server: RunningServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0, timeout=scaled(60))
    yield client
    client.close()


def model_of(server: RunningServer) -> str:
    return str(server.get_json("/v1/models")["data"][0]["id"])


GREEDY: dict[str, Any] = {"temperature": 0}


def test_a_response_without_streaming(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    r = oai.responses.create(model=model_of(tiny_server), input="Hi", max_output_tokens=8, **GREEDY)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text == r.output[0].content[0].text
    assert r.usage is not None and 1 <= r.usage.output_tokens <= 8 and r.usage.input_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert oai.responses.retrieve(r.id).output_text == r.output_text  # stored by default


def test_a_streamed_response_numbers_its_events_and_deltas_add_up(
    oai: openai.OpenAI, tiny_server: RunningServer
) -> None:
    with oai.responses.create(
        model=model_of(tiny_server), input="Tell me a story", max_output_tokens=16, stream=True, **GREEDY
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]  # 16 tokens of a random model: it never says its end-of-sequence token in time
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2  # token by token, not all at once
    final = events[-1].response
    assert "".join(deltas) == final.output_text and final.usage is not None and final.usage.output_tokens == 16
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    again = oai.responses.create(model=model_of(tiny_server), input="Tell me a story", max_output_tokens=16, **GREEDY)
    assert again.output_text == final.output_text  # the same text streamed or not


def test_previous_response_id_continues_the_conversation(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    model = model_of(tiny_server)
    first = oai.responses.create(model=model, input="My name is Ann.", max_output_tokens=6, **GREEDY)
    second = oai.responses.create(
        model=model, previous_response_id=first.id, input="What is my name?", max_output_tokens=6, **GREEDY
    )
    whole = oai.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "My name is Ann."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
        ],
        max_output_tokens=6,
        **GREEDY,
    )
    assert second.previous_response_id == first.id
    assert second.output_text == whole.output_text
    assert second.usage is not None and whole.usage is not None
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]


def test_instructions_are_a_system_message_and_are_not_carried_over(
    oai: openai.OpenAI, tiny_server: RunningServer
) -> None:
    model = model_of(tiny_server)
    plain = oai.responses.create(model=model, input="Hi", max_output_tokens=2, **GREEDY)
    told = oai.responses.create(model=model, input="Hi", instructions="Answer in French.", max_output_tokens=2)
    assert told.instructions == "Answer in French."
    assert told.usage.input_tokens > plain.usage.input_tokens  # type: ignore[union-attr]
    after = oai.responses.create(model=model, previous_response_id=told.id, input="Bye", max_output_tokens=2)
    assert after.instructions is None


def test_a_gone_or_unstored_previous_response_is_named(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    model = model_of(tiny_server)
    unstored = oai.responses.create(model=model, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    for missing in ("resp_doesnotexist", unstored.id):
        with pytest.raises(openai.BadRequestError) as err:
            oai.responses.create(model=model, previous_response_id=missing, input="Hi", max_output_tokens=2)
        body = err.value.body
        assert isinstance(body, dict) and body["code"] == "previous_response_not_found"
        assert body["param"] == "previous_response_id"


def test_a_background_response_is_read_later_and_resumed_from_a_sequence_number(
    oai: openai.OpenAI, tiny_server: RunningServer
) -> None:
    r = oai.responses.create(
        model=model_of(tiny_server), input="Count", max_output_tokens=24, background=True, **GREEDY
    )
    assert r.status in ("queued", "in_progress") and r.background
    with oai.responses.retrieve(r.id, stream=True) as stream:
        whole = list(stream)
    assert whole[-1].type == "response.incomplete"
    with oai.responses.retrieve(r.id, stream=True, starting_after=5) as stream:
        rest = list(stream)
    assert [e.sequence_number for e in rest] == list(range(6, len(whole)))
    assert [e.model_dump() for e in rest] == [e.model_dump() for e in whole[6:]]
    done = oai.responses.retrieve(r.id)
    assert done.status == "incomplete" and done.output_text == whole[-1].response.output_text


def test_a_background_response_is_cancelled(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    r = oai.responses.create(
        model=model_of(tiny_server),
        input="Go on forever",
        max_output_tokens=4000,
        background=True,
        extra_body={"ignore_eos": True},
    )
    cancelled = oai.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None and cancelled.usage.output_tokens < 4000
    with oai.responses.retrieve(r.id, stream=True) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"


def test_unsupported_fields_are_refused_by_name(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    model = model_of(tiny_server)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"temperature": -1}, "temperature"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"background": True, "store": False}, "store"),
        ({"input": "word " * 6000}, "input"),  # prompt_too_long names this API's field
    ]
    for fields, param in cases:
        body: dict[str, Any] = {"model": model, "input": "Hi", **fields}
        r = httpx.post(f"{tiny_server.http}/v1/responses", json=body, timeout=scaled(30))
        assert r.status_code == 400, (fields, r.text)
        assert r.json()["error"]["param"] == param


async def test_websocket_mode_with_the_openai_client_chains_turns(tiny_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0)
    model = model_of(tiny_server)
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": model, "input": "My name is Ann.",
                         "max_output_tokens": 6, "temperature": 0, "store": False})  # fmt: skip
        first = await _until_done(conn)
        await conn.send({"type": "response.create", "model": model, "previous_response_id": first["id"],
                         "input": "What is my name?", "max_output_tokens": 6, "temperature": 0})  # fmt: skip
        second = await _until_done(conn)
    await client.close()
    http = openai.OpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0)
    whole = http.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "My name is Ann."},
            {"role": "assistant", "content": first["output_text"]},
            {"role": "user", "content": "What is my name?"},
        ],
        max_output_tokens=6,
        temperature=0,
    )
    http.close()
    assert second["previous_response_id"] == first["id"] and second["output_text"] == whole.output_text


async def _until_done(conn: Any) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async for ev in conn:
            assert ev.type != "error", ev
            if ev.type in ("response.completed", "response.incomplete", "response.failed"):
                return dict(ev.response.model_dump())
        raise AssertionError("the socket closed before the response ended")

    return await asyncio.wait_for(read(), scaled(60))


async def test_websocket_mode_runs_streams_at_once_and_echoes_their_stream_id(tiny_server: RunningServer) -> None:
    model = model_of(tiny_server)
    url = tiny_server.http.replace("http://", "ws://") + "/v1/responses"
    async with websockets.connect(url) as ws:
        for lane in ("a", "b"):
            for n in (1, 2):
                await ws.send(json.dumps({"type": "response.create", "stream_id": lane, "model": model,
                                          "input": f"{lane}{n}", "max_output_tokens": 8}))  # fmt: skip
        ended: dict[str, list[str]] = {"a": [], "b": []}
        created: dict[str, list[str]] = {"a": [], "b": []}
        seen_running: set[str] = set()
        while sum(map(len, ended.values())) < 4:
            ev = json.loads(await asyncio.wait_for(ws.recv(), scaled(60)))
            assert ev["type"] != "error", ev
            lane = ev["stream_id"]
            if ev["type"] == "response.created":
                # FIFO within a lane: its next response starts only once the one before has ended
                assert len(created[lane]) == len(ended[lane])
                created[lane].append(ev["response"]["id"])
            if ev["type"] == "response.output_text.delta":
                seen_running.add(lane)
            if ev["type"] in ("response.completed", "response.incomplete"):
                if not any(ended.values()):
                    assert seen_running == {"a", "b"}  # the lanes ran at once
                ended[lane].append(ev["response"]["id"])
        assert ended == created
        # cancel by stream_id
        await ws.send(json.dumps({"type": "response.create", "stream_id": "c", "model": model, "input": "x",
                                  "max_output_tokens": 4000, "ignore_eos": True}))  # fmt: skip
        while True:
            ev = json.loads(await asyncio.wait_for(ws.recv(), scaled(60)))
            if ev["type"] == "response.output_text.delta":
                await ws.send(json.dumps({"type": "response.cancel", "stream_id": "c"}))
                break
        while ev["type"] != "response.incomplete":
            ev = json.loads(await asyncio.wait_for(ws.recv(), scaled(60)))
        assert ev["response"]["status"] == "cancelled" and ev["stream_id"] == "c"
        await ws.send(json.dumps({"type": "response.create", "model": model, "input": "x", "top_p": 0}))
        err = json.loads(await asyncio.wait_for(ws.recv(), scaled(60)))
        assert err["type"] == "error" and err["status"] == 400 and err["error"]["param"] == "top_p"


def test_a_client_that_leaves_a_stream_cancels_its_response(tiny_server: RunningServer) -> None:
    body = {"model": model_of(tiny_server), "input": "Go on", "max_output_tokens": 4000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{tiny_server.http}/v1/responses", json=body, timeout=scaled(60)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        created = None
        for line in lines:
            if line.startswith("data: ") and created is None:
                created = json.loads(line[6:])
            if line.startswith("event: response.output_text.delta"):
                break
    assert created is not None and created["type"] == "response.created"
    rid = created["response"]["id"]
    deadline = time.monotonic() + scaled(30)
    while (state := tiny_server.get_json(f"/v1/responses/{rid}"))["status"] == "in_progress":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["status"] == "cancelled" and state["usage"]["output_tokens"] < 4000


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CALL_TOKENS = 500  # OpenVINO's grammar allows any whitespace between JSON tokens: room for a random model's


def test_a_forced_tool_call_is_a_function_call_item_and_its_output_continues(
    oai: openai.OpenAI, tiny_server: RunningServer
) -> None:
    model = model_of(tiny_server)
    with oai.responses.create(
        model=model,
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=CALL_TOKENS,
        extra_body={"seed": 1},
        stream=True,
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds[2:] == [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(deltas) >= 2  # the arguments stream piece by piece
    call = events[-1].response.output[0]
    assert "".join(deltas) == call.arguments == events[-3].arguments
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    after = oai.responses.create(
        model=model,
        previous_response_id=events[-1].response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=4,
    )
    assert after.output[0].type == "message" and after.status in ("completed", "incomplete")


async def test_an_agent_turn_with_a_tool_call_over_the_websocket_mode(tiny_server: RunningServer) -> None:
    """The openai package's Responses WebSocket: a call, its result sent back as the next turn, an answer."""
    client = openai.AsyncOpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0)
    model = model_of(tiny_server)
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": model, "input": "Weather in Oslo?", "tools": [WEATHER],
                         "tool_choice": {"type": "function", "name": "get_weather"},
                         "max_output_tokens": CALL_TOKENS, "seed": 2})  # type: ignore[typeddict-unknown-key]  # fmt: skip
        first = await _until_done(conn)
        call = first["output"][0]
        assert call["type"] == "function_call" and call["name"] == "get_weather"
        result = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
        await conn.send({"type": "response.create", "model": model, "previous_response_id": first["id"],
                         "input": [result], "tools": [WEATHER], "max_output_tokens": 6})  # type: ignore[list-item]  # fmt: skip
        second = await _until_done(conn)
    await client.close()
    assert second["previous_response_id"] == first["id"] and second["status"] in ("completed", "incomplete")
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
