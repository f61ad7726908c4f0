"""``WS /v1/realtime``: OpenAI Realtime-compatible text events, with the official ``openai`` client against a real
server process, and event by event against a scripted engine (tests/fakes.py) in this process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.server import RunningServer, serve, serving
from tests.fakes import FakeEngine
from tokenwire.engine.interface import EngineError, EngineErrorCode
from tokenwire.server.requests.params import Limits
from tokenwire.server.settings import ServerSettings

RESPONSE_EVENTS = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    # response.output_text.delta, any number
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def test_the_openai_realtime_client_gets_a_streamed_text_response(tiny_server: RunningServer) -> None:
    model = tiny_server.get_json("/v1/models")["data"][0]["id"]
    client = openai.AsyncOpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0)
    async with client.realtime.connect(model=model) as conn:
        created = await asyncio.wait_for(conn.recv(), scaled(10))
        assert created.type == "session.created" and created.session.model == model
        await conn.session.update(session={"type": "realtime", "instructions": "Answer briefly.", "temperature": 0})
        updated = await asyncio.wait_for(conn.recv(), scaled(10))
        assert updated.type == "session.updated" and updated.session.instructions == "Answer briefly."
        await conn.conversation.item.create(item=user("Name a colour."))  # type: ignore[arg-type]
        added = await asyncio.wait_for(conn.recv(), scaled(10))
        assert added.type == "conversation.item.added" and added.item.content[0].text == "Name a colour."
        assert (await asyncio.wait_for(conn.recv(), scaled(10))).type == "conversation.item.done"
        await conn.response.create(response={"max_output_tokens": 24})
        kinds, deltas = [], []
        async for ev in conn:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            elif ev.type == "response.output_text.done":
                text_done = ev.text
            elif ev.type == "response.done":
                done = ev
                break
        assert [k for k in kinds if k != "response.output_text.delta"] == RESPONSE_EVENTS
        assert deltas and "".join(deltas) == text_done
        assert done.response.output[0].content[0].text == text_done
        use = done.response.usage
        assert 0 < use.output_tokens <= 24 and use.input_tokens > 0
        assert done.response.status == ("incomplete" if use.output_tokens == 24 else "completed")
    metrics = tiny_server.metrics()
    assert (
        metrics[
            "tokenwire_requests_total{api=realtime,finish_reason="
            + ("length" if use.output_tokens == 24 else "stop")
            + "}"
        ]
        >= 1
    )


@asynccontextmanager
async def realtime(engine: FakeEngine, query: str = "") -> AsyncIterator[Any]:
    async with serving(engine) as (base, _):
        url = base.replace("http", "ws", 1) + "/v1/realtime" + query
        async with websockets.connect(url, open_timeout=scaled(10)) as ws:
            yield ws


async def recv(ws: Any, timeout: float = 10) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), scaled(timeout)))
    assert msg["event_id"].startswith("event_")
    return msg


async def until(ws: Any, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first event of ``kind``, and every event before it."""
    seen = []
    for _ in range(10_000):
        msg = await recv(ws)
        if msg["type"] == kind:
            return msg, seen
        seen.append(msg)
    raise AssertionError(f"no {kind}")


async def test_responses_see_the_instructions_and_the_whole_conversation_in_order() -> None:
    engine = FakeEngine(reply="Blue.", pieces=2)
    async with realtime(engine) as ws:
        assert (await recv(ws))["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Be terse.", "seed": 3}}))
        await until(ws, "session.updated")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Sky?")}))
        await ws.send(json.dumps({"type": "response.create"}))
        done, before = await until(ws, "response.done")
        assert "".join(m["delta"] for m in before if m["type"] == "response.output_text.delta") == "Blue."
        assert (
            done["response"]["status"] == "completed" and done["response"]["usage"]["output_tokens"] == 3
        )  # "Bl", "ue", "."
        engine.reply = "Green."
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Grass?")}))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 7}}))
        await until(ws, "response.done")
        req = engine.requests[-1]
        assert [(m.role, m.content) for m in req.messages or ()] == [
            ("system", "Be terse."),
            ("user", "Sky?"),
            ("assistant", "Blue."),
            ("user", "Grass?"),
        ]
        assert req.params.max_tokens == 7 and req.params.seed == 3
        # out of band: only the given input, and the conversation is left as it was
        await ws.send(
            json.dumps({"type": "response.create", "response": {"conversation": "none", "input": [user("Alone")]}})
        )
        done, before = await until(ws, "response.done")
        assert "conversation.item.added" not in [m["type"] for m in before]
        assert done["response"]["conversation_id"] is None
        assert [(m.role, m.content) for m in engine.requests[-1].messages or ()] == [
            ("system", "Be terse."),
            ("user", "Alone"),
        ]


async def test_cancel_ends_the_response_as_cancelled_and_a_new_one_can_follow() -> None:
    engine = FakeEngine(reply="word " * 200, pieces=200, delay=0.02)
    async with realtime(engine) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Talk")}))
        await ws.send(json.dumps({"type": "response.create"}))
        await until(ws, "response.output_text.delta")
        await ws.send(json.dumps({"type": "response.create"}))  # one response writes to the conversation at a time
        err, _ = await until(ws, "error")
        assert err["error"]["code"] == "conversation_already_has_active_response"
        await ws.send(json.dumps({"type": "response.cancel"}))
        done, _ = await until(ws, "response.done")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        assert done["response"]["output"][0]["status"] == "incomplete"
        assert len(engine.aborted) == 1
        engine.reply, engine.pieces, engine.delay = "Again.", 1, 0.0
        await ws.send(json.dumps({"type": "response.create"}))
        done, _ = await until(ws, "response.done")
        assert done["response"]["status"] == "completed"


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ("{nope", "invalid_json", None),
        ({"type": "session.dance"}, "unknown_type", "type"),
        ({"type": "input_audio_buffer.append", "audio": "AAAA"}, "unsupported", None),
        ({"type": "session.update", "session": {"output_modalities": ["audio"]}}, "unsupported", "session"),
        ({"type": "session.update", "session": {"temperature": -1}}, "invalid_request", "session.temperature"),
        (
            {"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}},
            "unsupported",
            "session.tools",
        ),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AA"}]},
            },
            "unsupported",
            "item.content[0]",
        ),
        (
            {"type": "conversation.item.create", "item": {"type": "function_call", "name": "f"}},
            "unsupported",
            "item.type",
        ),
        (
            {"type": "conversation.item.create", "item": {"type": "message", "role": "pirate", "content": []}},
            "invalid_request",
            "item.role",
        ),
        ({"type": "conversation.item.delete", "item_id": "item_missing"}, "item_not_found", "item_id"),
        (
            {"type": "response.create", "response": {"max_output_tokens": 0}},
            "invalid_request",
            "response.max_output_tokens",
        ),
        ({"type": "response.create"}, "invalid_request", "response"),  # nothing to answer yet
        ({"type": "response.cancel"}, "response_cancel_not_active", None),
    ],
)
async def test_each_bad_event_gets_an_error_naming_it_and_the_connection_goes_on(
    event: Any, code: str, param: str | None
) -> None:
    engine = FakeEngine(reply="Fine.")
    async with realtime(engine) as ws:
        await recv(ws)
        await ws.send(event if isinstance(event, str) else json.dumps({**event, "event_id": "evt_1"}))
        err = await recv(ws)
        assert err["type"] == "error", err
        assert err["error"]["code"] == code and err["error"]["param"] == param and err["error"]["message"]
        if not isinstance(event, str):
            assert err["error"]["event_id"] == "evt_1"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Still there?")}))
        await ws.send(json.dumps({"type": "response.create"}))
        done, _ = await until(ws, "response.done")
        assert done["response"]["output"][0]["content"][0]["text"] == "Fine."


async def test_a_conversation_holds_a_bounded_amount_of_text() -> None:
    """Items are bounded in number and, together, in size (4 x --max-message-bytes of text): a client cannot
    grow a connection's memory without end."""
    engine = FakeEngine()
    settings = ServerSettings(limits=Limits(max_message_bytes=10_000))
    async with (
        serving(engine, settings=settings) as (base, _),
        websockets.connect(base.replace("http", "ws", 1) + "/v1/realtime") as ws,
    ):
        await recv(ws)
        for _ in range(4):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": user("x" * 9_000)}))
            assert (await until(ws, "conversation.item.done"))[0]["item"]["role"] == "user"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("x" * 9_000)}))
        err, _ = await until(ws, "error")
        assert "delete some items" in err["error"]["message"] and err["error"]["param"] == "item"


async def test_items_can_be_retrieved_inserted_and_deleted() -> None:
    engine = FakeEngine(reply="Ok.")
    async with realtime(engine) as ws:
        await recv(ws)
        for i, text in enumerate(("first", "third")):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {**user(text), "id": f"i{i}"}}))
            await until(ws, "conversation.item.done")
        insert = {"type": "conversation.item.create", "previous_item_id": "i0", "item": {**user("second"), "id": "i9"}}
        await ws.send(json.dumps(insert))
        added, _ = await until(ws, "conversation.item.added")
        assert added["previous_item_id"] == "i0"
        await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "i9"}))
        got, _ = await until(ws, "conversation.item.retrieved")
        assert got["item"]["content"] == [{"type": "input_text", "text": "second"}]
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "i0"}))
        assert (await until(ws, "conversation.item.deleted"))[0]["item_id"] == "i0"
        await ws.send(json.dumps({"type": "response.create"}))
        await until(ws, "response.done")
        assert [m.content for m in engine.requests[-1].messages or ()] == ["second", "third"]


async def test_an_engine_error_fails_the_response_with_its_reason() -> None:
    engine = FakeEngine()
    engine.fail_with = EngineError(EngineErrorCode.PROMPT_TOO_LONG, "the prompt is 9000 tokens; the context holds 1024")
    async with realtime(engine) as ws:
        await recv(ws)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("x" * 100)}))
        await ws.send(json.dumps({"type": "response.create", "event_id": "evt_go"}))
        err, _ = await until(ws, "error")
        assert err["error"]["code"] == "prompt_too_long" and err["error"]["event_id"] == "evt_go"
        done, _ = await until(ws, "response.done")
        assert done["response"]["status"] == "failed"
        assert done["response"]["status_details"]["error"]["code"] == "prompt_too_long"


async def test_a_client_that_goes_away_aborts_its_response() -> None:
    engine = FakeEngine(reply="word " * 300, pieces=300, delay=0.02)
    async with serving(engine) as (base, _):
        ws = await websockets.connect(base.replace("http", "ws", 1) + "/v1/realtime")
        await recv(ws)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Talk")}))
        await ws.send(json.dumps({"type": "response.create"}))
        await until(ws, "response.output_text.delta")
        await ws.close()
        t0 = time.monotonic()
        while not engine.closed_early:
            assert time.monotonic() - t0 < scaled(2)
            await asyncio.sleep(0.02)


async def test_a_wrong_model_is_refused_with_an_error_event_and_close_1008() -> None:
    async with realtime(FakeEngine(), "?model=gpt-9") as ws:
        err = await recv(ws)
        assert (
            err["type"] == "error" and err["error"]["code"] == "model_not_found" and "gpt-9" in err["error"]["message"]
        )
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_with_an_api_key_realtime_needs_it(tiny_long_model_dir: Path) -> None:
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--api-key", "sekret") as server:
        listed = httpx.get(server.http + "/v1/models", headers={"Authorization": "Bearer sekret"}, timeout=10)
        model = listed.json()["data"][0]["id"]
        bad = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="wrong", max_retries=0)
        async with bad.realtime.connect(model="x") as conn:
            ev = await asyncio.wait_for(conn.recv(), scaled(10))
            assert ev.type == "error" and ev.error.code == "unauthorized"
        good = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="sekret", max_retries=0)
        async with good.realtime.connect(model=model) as conn:
            assert (await asyncio.wait_for(conn.recv(), scaled(10))).type == "session.created"


async def test_server_shutdown_ends_the_response_then_says_why_and_closes_1001() -> None:
    """The server stops (what SIGTERM runs: ServerState.drain) with a response streaming that the drain timeout
    does not let finish: it ends with its
    response.done (cancelled, reason server_shutting_down, holding the text sent so far), an error event
    shutting_down follows and the socket closes with 1001. Until then the connection is counted in /v1/stats
    and the connections gauge."""
    engine = FakeEngine(reply="word " * 300, pieces=300, delay=0.02)
    async with serving(engine) as (base, state), httpx.AsyncClient(base_url=base) as http:
        async with websockets.connect(base.replace("http", "ws", 1) + "/v1/realtime") as ws:
            await recv(ws)
            assert (await http.get("/v1/stats")).json()["realtime_connections"] == 1
            assert "tokenwire_websocket_connections 1.0" in (await http.get("/metrics")).text
            await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Talk")}))
            await ws.send(json.dumps({"type": "response.create"}))
            first, _ = await until(ws, "response.output_text.delta")
            state.drain_timeout = 0.2
            draining = asyncio.create_task(state.drain())
            done, before = await until(ws, "response.done")
            deltas = "".join(e["delta"] for e in [first, *before] if e["type"] == "response.output_text.delta")
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "server_shutting_down"
            assert 0 < len(deltas) < len(engine.reply)
            assert done["response"]["output"][0]["content"][0]["text"] == deltas
            err = await recv(ws)
            assert err["type"] == "error" and err["error"]["code"] == "shutting_down"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            await asyncio.wait_for(draining, scaled(5))
        assert len(engine.aborted) == 1 and not state.realtime_connections


async def test_a_client_that_stops_reading_has_its_response_paused_then_gets_it_whole() -> None:
    """A Realtime client with a tiny receive buffer that reads nothing: once 16 KiB sit unread in its socket the
    server pauses the response in the engine (no compute); reading again, it is unpaused and the client gets every
    delta and a completed response.done."""
    import socket

    engine = FakeEngine(reply="word " * 20_000, pieces=2_000, delay=0.001, honour_pause=True)
    async with serving(engine) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        async with websockets.connect(base.replace("http", "ws", 1) + "/v1/realtime", sock=sock, max_queue=1) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": user("Talk")}))
            await ws.send(json.dumps({"type": "response.create"}))
            for _ in range(int(scaled(200))):
                if engine.paused:
                    break
                await asyncio.sleep(0.05)
            assert engine.paused, "the response was never paused"
            done, events = await until(ws, "response.done")
            deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert done["response"]["status"] == "completed" and deltas == engine.reply
            assert not engine.paused  # unpaused once the client read
