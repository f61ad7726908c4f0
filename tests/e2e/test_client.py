"""``tokenwire.client``: the Python client against real servers (a scripted engine served in this event loop,
the tiny model in its own process) and against a scripted peer that plays the server's side of a resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import scaled, wait_until
from tests.e2e.server import RunningServer, free_port, serving
from tests.fakes import FakeEngine
from tokenwire.client import (
    Client,
    ConnectionFailed,
    ConnectionState,
    Delta,
    FinishReason,
    InvalidRequest,
    NotFound,
    SyncClient,
    Unauthorized,
)
from tokenwire.server.admission.auth import AuthPolicy


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def drop_every_socket(state: Any) -> None:
    for conn in list(state.connections):
        await conn.ws.close(1012)  # the server drops the socket, as a restarting proxy would


def check_once_in_order(deltas: list[Delta]) -> None:
    seqs = [d.seq for d in deltas]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # started is 0; no gap, no repeat


async def test_generate_streams_the_answer_with_usage_and_timings_at_the_end() -> None:
    engine = FakeEngine(reply="Hello, world!", pieces=3)
    async with serving(engine) as (base, _), Client(ws_url(base)) as client:
        assert client.hello is not None and client.hello.model == "fake-model"
        gen = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0)
        deltas = [d async for d in gen]
    assert "".join(d.text for d in deltas) == "Hello, world!" == gen.text
    check_once_in_order(deltas)
    assert gen.finish_reason is FinishReason.STOP and gen.prompt_tokens == 7
    assert gen.usage is not None and gen.usage.completion_tokens == len(deltas)
    assert gen.timings is not None and gen.timings.tokens_per_second == 100.0
    assert engine.requests[0].params.max_tokens == 16 and engine.requests[0].params.temperature == 0


async def test_several_generations_run_at_once_on_one_connection() -> None:
    engine = FakeEngine(reply="abcdefghij", pieces=10, delay=0.01)
    async with serving(engine) as (base, state), Client(ws_url(base)) as client:
        gens = [client.generate(f"question {i}") for i in range(4)]
        texts = await asyncio.gather(*(g.collect() for g in gens))
        assert len(state.connections) == 1
    assert texts == ["abcdefghij"] * 4 and len({g.id for g in gens}) == 4


async def test_breaking_out_of_the_loop_cancels_on_the_server() -> None:
    engine = FakeEngine(reply="x" * 400, pieces=400, delay=0.01)
    async with serving(engine) as (base, _), Client(ws_url(base)) as client:
        gen = client.generate("Talk")
        async for _ in gen:
            break
        await wait_until(lambda: len(engine.aborted) == 1)
        assert gen.done
        # the connection goes on
        assert await client.generate("Again").collect() == "x" * 400


async def test_cancel_ends_the_loop_with_finish_reason_cancelled() -> None:
    engine = FakeEngine(reply="x" * 400, pieces=400, delay=0.01)
    async with serving(engine) as (base, _), Client(ws_url(base)) as client:
        gen = client.generate("Talk")
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                await gen.cancel()
    assert gen.finish_reason is FinishReason.CANCELLED and len(gen.text) < 400


async def test_a_refused_parameter_raises_its_typed_error_and_the_connection_goes_on() -> None:
    async with serving(FakeEngine()) as (base, _), Client(ws_url(base)) as client:
        with pytest.raises(InvalidRequest) as refused:
            await client.generate("Hi", temperature=99).collect()
        assert refused.value.param == "temperature" and "temperature" in refused.value.message
        assert await client.generate("Hi").collect() == "Hello, world!"


async def test_a_wrong_key_is_unauthorized_and_the_right_one_connects() -> None:
    async with serving(FakeEngine(), auth=AuthPolicy(api_keys=("sekrit",))) as (base, _):
        with pytest.raises(Unauthorized):
            await Client(ws_url(base), api_key="wrong").connect()
        with pytest.raises(Unauthorized):
            await Client(ws_url(base)).connect()
        async with Client(ws_url(base), api_key="sekrit") as client:
            assert await client.generate("Hi").collect() == "Hello, world!"


async def test_no_server_is_a_connection_failure_naming_the_url() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with pytest.raises(ConnectionFailed, match="cannot connect to " + url):
        await Client(url, open_timeout=scaled(5)).connect()


async def test_the_server_dropping_the_socket_twice_mid_answer_loses_and_repeats_nothing() -> None:
    """The server drops the connection twice while the answer streams; the client reconnects, resumes from the
    last seq it received, and the loop sees every delta once, in order: exactly the engine's text, one request."""
    reply = " ".join(f"w{i}" for i in range(200))
    engine = FakeEngine(reply=reply, pieces=200, delay=0.01)
    states: list[ConnectionState] = []
    deltas: list[Delta] = []
    async with serving(engine) as (base, state), Client(ws_url(base), on_state=states.append, min_delay=0.05) as c:
        async for delta in c.generate("Count"):
            deltas.append(delta)
            if len(deltas) in (5, 60):
                await drop_every_socket(state)
    assert "".join(d.text for d in deltas) == reply
    check_once_in_order(deltas)
    assert len(engine.requests) == 1 and not engine.aborted
    assert states.count(ConnectionState.RECONNECTING) == 2 and states[-1] is ConnectionState.CLOSED


async def test_a_dropped_connection_mid_answer_gives_the_same_greedy_text_as_an_uninterrupted_run(
    tiny_server: RunningServer,
) -> None:
    """The real model, greedy: the client's socket vanishes twice mid-answer; the caller's loop gets the text of
    a run that was never interrupted, every delta once."""
    request: dict[str, Any] = {"max_tokens": 120, "temperature": 0, "ignore_eos": True}
    states: list[ConnectionState] = []
    async with Client(tiny_server.ws + "/ws", min_delay=0.05, on_state=states.append) as client:
        whole = await client.generate("Tell me a story about a lighthouse", **request).collect()
        deltas: list[Delta] = []
        gen = client.generate("Tell me a story about a lighthouse", **request)
        async for delta in gen:
            deltas.append(delta)
            if len(deltas) in (3, 40):
                assert client._ws is not None
                client._ws.transport.abort()  # the network goes away: no close handshake
    assert gen.text == whole and "".join(d.text for d in deltas) == whole
    check_once_in_order(deltas)
    assert gen.usage is not None and gen.usage.completion_tokens == 120
    assert states.count(ConnectionState.RECONNECTING) == 2  # both drops came while the answer still ran


def test_the_sync_client_streams_and_leaving_the_loop_early_cancels(tiny_server: RunningServer) -> None:
    with SyncClient(tiny_server.ws + "/ws") as client:
        gen = client.generate("Hi", max_tokens=5, temperature=0, ignore_eos=True)
        deltas = list(gen)
        assert gen.finish_reason is FinishReason.LENGTH and gen.usage is not None
        assert gen.usage.completion_tokens == 5 and "".join(d.text for d in deltas) == gen.text
        long = client.generate("Hi", max_tokens=2000, temperature=0, ignore_eos=True)
        for _ in long:
            break
        assert long.done and long.finish_reason is None
        assert len(client.generate("Hi", max_tokens=3, ignore_eos=True).collect()) > 0  # the connection goes on


# -- a scripted peer: plays the server's side, to check exactly what the client sends


Handler = Callable[[ServerConnection, int], Awaitable[None]]


@asynccontextmanager
async def peer(handler: Handler) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A WebSocket server on 127.0.0.1 that runs ``handler(ws, connection_number)``; yields its URL and every
    message the client sent, in order."""
    received: list[dict[str, Any]] = []
    count = 0

    async def run(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        original_recv = ws.recv

        async def recv(*args: Any, **kwargs: Any) -> Any:
            raw = await original_recv(*args, **kwargs)
            received.append(json.loads(raw))
            return raw

        ws.recv = recv  # type: ignore[method-assign]
        await handler(ws, count)

    async with serve(run, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", received


def hello(session: str) -> str:
    return json.dumps({"type": "hello", "content": "", "finished": False, "session": session, "model": "m"})


def msg(kind: str, seq: int, **fields: Any) -> str:
    return json.dumps({"type": kind, "id": "g1", "seq": seq, "content": "", "finished": kind == "complete", **fields})


async def test_heartbeats_are_answered_and_a_resume_carries_the_session_last_seq_and_resume_token() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 1:
            await ws.send(hello("s1"))
            await ws.send(json.dumps({"type": "ping", "ts": 123, "content": "", "finished": False}))
            for _ in range(2):  # the pong and the generate, in either order
                await ws.recv()
            await ws.send(msg("started", 0, resume_token="tok", prompt_tokens=3))
            await ws.send(msg("token", 1, content="Hel", tokens=1))
            await ws.send(msg("token", 2, content="lo", tokens=1))
            await asyncio.sleep(0.1)
            ws.transport.abort()
        else:
            await ws.send(hello("s2"))
            await ws.recv()  # the resume
            await ws.send(json.dumps({"type": "resumed", "id": "g1", "after_seq": 2, "content": "", "finished": False}))
            await ws.send(msg("token", 2, content="lo", tokens=1))  # a repeat the client must drop
            await ws.send(msg("token", 3, content=", world", tokens=2))
            await ws.send(msg("complete", 4, finish_reason="stop"))
            await ws.wait_closed()

    async with peer(handler) as (url, received), Client(url, min_delay=0.05) as client:
        gen = client.generate("Hi", id="g1")
        assert await gen.collect() == "Hello, world"
    kinds = [m["type"] for m in received]
    assert kinds[:3] == ["pong", "generate", "resume"] or kinds[:3] == ["generate", "pong", "resume"]
    assert {"type": "pong", "ts": 123} in received
    resume = next(m for m in received if m["type"] == "resume")
    assert resume == {"type": "resume", "id": "g1", "after_seq": 2, "session": "s1", "resume_token": "tok"}


async def test_a_generation_the_server_no_longer_has_after_a_drop_raises_not_found() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        await ws.send(hello(f"s{n}"))
        if n == 1:
            await ws.recv()
            await ws.send(msg("started", 0, resume_token="tok"))
            await ws.send(msg("token", 1, content="Hel", tokens=1))
            ws.transport.abort()
        else:
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "type": "error",
                        "id": "g1",
                        "code": "not_found",
                        "content": "no such generation",
                        "finished": True,
                    }
                )
            )
            await ws.wait_closed()

    async with peer(handler) as (url, _), Client(url, min_delay=0.05) as client:
        gen = client.generate("Hi", id="g1")
        with pytest.raises(NotFound, match="no such generation"):
            await gen.collect()
        assert gen.text == "Hel"  # what arrived before the drop was delivered first


async def test_a_connection_that_cannot_come_back_fails_the_running_generation_after_the_reconnect_time() -> None:
    async def handler(ws: ServerConnection, n: int) -> None:
        if n == 1:
            await ws.send(hello("s1"))
            await ws.recv()
            await ws.send(msg("started", 0, resume_token="tok"))
            ws.transport.abort()
        else:  # every later connection is turned away, as a server at its connection limit does (1013)
            await ws.send(json.dumps({"type": "error", "code": "overloaded", "content": "full", "finished": True}))
            await ws.close(1013)

    async with peer(handler) as (url, received), Client(url, min_delay=0.05, reconnect_timeout=0.6) as client:
        with pytest.raises(ConnectionFailed, match="could not get it back: overloaded: full"):
            await client.generate("Hi", id="g1").collect()
        assert client.state is ConnectionState.CLOSED
    assert [m["type"] for m in received] == ["generate"]  # no resume reached a server that had it


async def test_a_generation_on_a_closed_client_fails_at_once_and_stays_ended() -> None:
    async with serving(FakeEngine()) as (base, _):
        client = Client(ws_url(base))
        await client.connect()
        await client.close()
        gen = client.generate("Hi")
        with pytest.raises(ConnectionFailed, match="the client is closed"):
            await gen.next()
        assert gen.done and await gen.next() is None
