"""What a hostile or clumsy client found (issue 10), over real sockets against a real server process: input that
once failed other clients' answers, closed the connection, or crashed a handler. Each test fails on the code
before the fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer

LONG = {"prompt": "Tell me a story", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

# frames the JSON parser accepts but Python cannot convert, or nests past any use; the field each must name
UNCONVERTIBLE = [
    ('{"type": "generate", "id": "n1", "prompt": "x", "temperature": ' + "9" * 4000 + "}", "temperature"),
    ('{"type": "generate", "id": "n2", "prompt": "x", "batch": {"max_tokens": 1e999}}', "batch.max_tokens"),
    ('{"type": "generate", "id": "n3", "prompt": "x", "top_p": -1e999}', "top_p"),
    ('{"type": "ping", "ts": 1e999}', "ts"),
    ('{"type": "ping", "ts": ' + "[" * 970 + "]" * 970 + "}", None),
]


async def test_extreme_sampling_values_are_refused_and_other_answers_go_on(tiny_server: RunningServer) -> None:
    """temperature or repetition_penalty of 1e-300 (well typed, not samplable) once made the sampler fail every
    generation of its step, for every client. Now they are refused naming the parameter; a generation running
    beside them, on another connection and on the same one, completes."""
    other = await Client.connect(tiny_server.ws)
    c = await Client.connect(tiny_server.ws)
    try:
        await other.send({"type": "generate", "id": "theirs", **LONG})
        await c.send({"type": "generate", "id": "mine", **LONG})
        await other.until(lambda m: m.get("id") == "theirs" and m["type"] == "token")
        for i, (param, value) in enumerate((("temperature", 1e-300), ("repetition_penalty", 1e-300))):
            await c.send({"type": "generate", "id": f"bad{i}", "prompt": "x", param: value})
            err = await c.finish(f"bad{i}")
            assert err["type"] == "error" and err["code"] == "invalid_request" and err["param"] == param
        for client, gen_id in ((other, "theirs"), (c, "mine")):
            done = await client.finish(gen_id)
            assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 400
    finally:
        await c.close()
        await other.close()


async def test_unconvertible_numbers_and_deep_nesting_get_an_error_and_the_connection_stays(
    tiny_server: RunningServer,
) -> None:
    """A 4,000-digit number, 1e999, a ts nested 970 levels: each once closed the socket with 1000 (no error, the
    generations orphaned). Now each is invalid_request naming the field where it can; the connection and the
    generation running on it go on, and a pong never echoes a value that is not JSON."""
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "live", **LONG})
        await c.until(lambda m: m.get("id") == "live" and m["type"] == "token")
        for frame, param in UNCONVERTIBLE:
            await c.send(frame)
            err = await c.until(lambda m: m["type"] in ("error", "pong") and m.get("id") != "live")
            assert err["type"] == "error" and err["code"] == "invalid_request", err
            if param is not None:
                assert err.get("param") == param and param in err["content"], err
        await c.send('{"type": "ping", "ts": 12.5}')
        assert (await c.until(lambda m: m["type"] == "pong"))["ts"] == 12.5
        done = await c.finish("live")
        assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 400
        c.check_sequence("live")
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": ' + "9" * 4000 + "}", "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 1e-300}', "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "metadata": ' + "[" * 970 + "]" * 970 + "}", None),
    ],
)
def test_http_gets_an_openai_400_for_the_same_values(tiny_server: RunningServer, body: str, param: str | None) -> None:
    """Over HTTP the same values once gave a plain-text 500."""
    r = httpx.post(
        tiny_server.http + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=scaled(30),
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def test_realtime_refuses_a_huge_number_with_an_error_event_and_stays_open(tiny_server: RunningServer) -> None:
    """A huge integer in session.update once closed the Realtime socket."""
    async with websockets.connect(tiny_server.ws + "/v1/realtime", open_timeout=scaled(10)) as ws:

        async def next_event() -> dict[str, Any]:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), scaled(10))))

        assert (await next_event())["type"] == "session.created"
        await ws.send('{"type": "session.update", "session": {"type": "realtime", "temperature": ' + "7" * 4000 + "}}")
        err = await next_event()
        assert err["type"] == "error" and err["error"]["code"] == "invalid_request"
        assert err["error"]["param"] == "session.temperature"
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Hi."}}))
        updated = await next_event()
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Hi."
