"""Flow control over a real server, on both engines: a reader that falls behind pauses its own generation (and no
one else's), is not cut, and gets everything once it reads again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer


async def wait_stats(server: RunningServer, pred: object, timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        engine: dict[str, int] = server.get_json("/v1/stats")["engine"]
        if pred(engine):  # type: ignore[operator]
            return engine
        assert time.monotonic() < deadline, engine
        await asyncio.sleep(0.05)


async def test_a_reader_that_stops_reading_is_paused_not_cut_and_gets_everything_when_it_reads(
    tiny_server: RunningServer,
) -> None:
    """A client with a tiny receive buffer that reads nothing: its generation stops being computed once it is a
    bounded distance ahead (the socket buffers plus --max-unsent-tokens), the connection stays open, and another
    client's generation runs to its end meanwhile. When the client reads again, the generation goes on: every seq
    once and in order, every token counted, later text merged into fewer messages of the type it asked for."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tiny_server.port))
    sock.setblocking(False)
    stuck = await Client.connect(tiny_server.ws + "/ws", sock=sock, max_queue=1)
    await stuck.send(
        {"type": "generate", "id": "big", "prompt": "Tell me a story", "max_tokens": 4000, "ignore_eos": True}
    )
    await wait_stats(tiny_server, lambda e: e["paused"] == 1 and e["running"] == 0)
    steps = tiny_server.get_json("/v1/stats")["engine"]["steps"]

    other = await Client.connect(tiny_server.ws)
    await other.send({"type": "generate", "id": "o", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True})
    end = await other.finish("o")
    assert end["type"] == "complete" and end["usage"]["completion_tokens"] == 30
    await other.close()
    # Still paused: the stuck client read nothing. The kernel may take more bytes into the server's send buffer
    # after the pause (it grows that buffer as it goes; seen in about one run of five on an AMD EPYC, 56 to 180
    # more steps), so the generation can go on in bursts and pause again until the kernel's buffers are full:
    # wait until it stays paused, computing nothing for half a second, well before its end.
    for _ in range(40):
        engine = await wait_stats(tiny_server, lambda e: e["paused"] == 1 and e["running"] == 0, timeout=10)
        await asyncio.sleep(0.5)
        if tiny_server.get_json("/v1/stats")["engine"]["steps"] == engine["steps"]:
            break
    else:
        raise AssertionError("the stuck reader's generation never stayed paused")
    assert engine["steps"] - steps <= 2000  # nowhere near its 4000 tokens: it did not run on to its end

    done = await stuck.finish("big", timeout=120)  # reading again: it continues
    assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 4000
    stuck.check_sequence("big")
    msgs = stuck.by_id["big"][1:-1]
    # Every token with text is in a message; tokens that decode to no text (a random model's special tokens)
    # ride on the next message with text, and only those at the very end are counted in usage alone.
    assert 4000 - 8 <= sum(m["tokens"] for m in msgs) <= 4000
    assert all(m["type"] == "token" for m in msgs)  # it never asked for batches: still token messages
    assert any(m["tokens"] > 1 for m in msgs)  # merged while it was behind
    assert tiny_server.get_json("/v1/stats")["engine"]["paused"] == 0
    await stuck.close()


async def test_only_the_slow_reader_is_paused(tiny_server: RunningServer) -> None:
    """Eight readers; one stops reading. Its generation is paused; the seven others run to their end unpaused."""
    readers = [await Client.connect(tiny_server.ws) for _ in range(7)]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tiny_server.port))
    sock.setblocking(False)
    slow = await Client.connect(tiny_server.ws + "/ws", sock=sock, max_queue=1)
    request = {"type": "generate", "id": "g", "prompt": "Tell me a story", "max_tokens": 3000, "ignore_eos": True}
    await slow.send(request)
    for r in readers:
        await r.send({**request, "max_tokens": 400})
    ends = await asyncio.gather(*(r.finish("g", timeout=120) for r in readers))
    assert all(e["type"] == "complete" and e["usage"]["completion_tokens"] == 400 for e in ends)
    await wait_stats(tiny_server, lambda e: e["paused"] == 1 and e["running"] == 0)
    for r in readers:
        await r.close()
    # Cancelled, not left paused for the resume window: the next test on this server counts paused generations.
    await slow.send({"type": "cancel", "id": "g"})
    await wait_stats(tiny_server, lambda e: e["paused"] == 0)
    await slow.vanish()


async def test_an_sse_reader_that_stops_reading_is_paused_and_gets_everything_when_it_reads(
    tiny_server: RunningServer,
) -> None:
    """The OpenAI streaming door: a client that reads nothing stalls the server's writes; the generation is paused
    (no compute) instead of running to its end into buffers; reading again, the client gets every chunk, then
    the usage (all tokens) and [DONE]."""
    import json

    model = tiny_server.get_json("/v1/models")["data"][0]["id"]
    body = json.dumps(
        {
            "model": model,
            "prompt": "Tell me a story",
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", tiny_server.port, limit=1024)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), scaled(30))
    assert b" 200 " in head.split(b"\r\n")[0]
    try:
        writer.transport.pause_reading()  # read nothing more
        await wait_stats(tiny_server, lambda e: e["paused"] == 1 and e["running"] == 0, timeout=60)
        writer.transport.resume_reading()
        data = b""
        while b"data: [DONE]" not in data:
            chunk = await asyncio.wait_for(reader.read(65536), scaled(60))
            assert chunk, "the stream ended early"
            data += chunk
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: {")]
    usage = [json.loads(e)["usage"] for e in events if '"usage"' in e and json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 4000
    await wait_stats(tiny_server, lambda e: e["paused"] == 0, timeout=10)  # nothing stays paused


async def test_a_reader_that_reads_slowly_is_not_taken_for_a_slow_consumer() -> None:
    """With a slow-consumer timeout of 0.5 s, a client with a tiny receive buffer that reads a message every 50 ms
    (the server merges what waits into a few large messages, each taking longer than the timeout to pass through
    that buffer) stays connected to the end: only a client that reads nothing at all for the timeout is closed."""
    from tests.e2e.server import serving
    from tests.fakes import FakeEngine
    from tokenwire.server.settings import ServerSettings

    engine = FakeEngine(reply="x" * 600_000, pieces=600, delay=0.005)  # 1 KB pieces, faster than it reads
    settings = ServerSettings(heartbeat_interval=0, slow_consumer_timeout=0.5)
    async with serving(engine, settings=settings) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        slow = await Client.connect(base.replace("http", "ws", 1) + "/ws", sock=sock, max_queue=1)
        await slow.send({"type": "generate", "id": "g", "prompt": "x"})
        while (await slow.recv())["type"] != "complete":  # raises if the server closed it
            await asyncio.sleep(0.05)
        assert slow.text("g") == engine.reply
        await slow.vanish()


async def test_a_paused_constrained_generation_goes_on_with_its_document_where_it_was(
    tiny_server: RunningServer,
) -> None:
    """A JSON-schema generation whose reader stops is paused, and comes back with its text so far in its prompt:
    its grammar must go on from that text (the OpenVINO engine once started the document again, so the answer
    held a second '[' midway). The whole text is one document of the schema, or the start of one at max_tokens."""
    import json

    from tokenwire.engine.grammar.residual import residual
    from tokenwire.engine.grammar.schema import compile_schema

    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tiny_server.port))
    sock.setblocking(False)
    stuck = await Client.connect(tiny_server.ws + "/ws", sock=sock, max_queue=1)
    await stuck.send({"type": "generate", "id": "j", "prompt": "Numbers", "max_tokens": 3000, "json_schema": schema})
    await wait_stats(tiny_server, lambda e: e["paused"] == 1 and e["running"] == 0)
    await asyncio.sleep(0.3)
    done = await stuck.finish("j", timeout=120)
    assert done["type"] == "complete", done
    stuck.check_sequence("j")
    text = stuck.text("j")
    assert text.count("[") == 1, text[:200]
    if done["finish_reason"] == "stop":
        assert len(json.loads(text)) >= 1000
    else:
        residual(compile_schema(json.dumps(schema)), text)  # raises unless some document begins with it
