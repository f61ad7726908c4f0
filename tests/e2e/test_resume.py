"""``resume``: a client that lost its connection gets every later message of its generation exactly once.

Against a real server process on the tiny random model (resume window RESUME_WINDOW seconds). Greedy decoding
makes the text of a generation reproducible, so a resumed stream is compared with the same request run whole
beforehand, alone (run side by side, two greedy streams can part ways: batch shapes change float sums).
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.conftest import RESUME_WINDOW
from tests.e2e.server import RunningServer, serve, serving
from tests.fakes import FakeEngine
from tokenwire.server.settings import ServerSettings
from tokenwire.server.telemetry import public_ref


def story(gen_id: str, max_tokens: int = 600) -> dict[str, Any]:
    return {
        "type": "generate",
        "id": gen_id,
        "prompt": "Tell me a story about a lighthouse",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def seqs(msgs: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in msgs]


def text_of(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"] for m in msgs if m["type"] in ("token", "tokens"))


async def reference(server: RunningServer, msg: dict[str, Any]) -> str:
    c = await Client.connect(server.ws)
    try:
        await c.send(msg)
        assert (await c.finish(msg["id"]))["type"] == "complete"
        c.check_sequence(msg["id"])
        return c.text(msg["id"])
    finally:
        await c.close()


async def read_until_seq(c: Client, gen_id: str, seq: int) -> None:
    await c.until(lambda m: m.get("id") == gen_id and m.get("seq", -1) >= seq)


async def test_resume_after_a_dropped_connection_continues_without_loss_or_repeat(tiny_server: RunningServer) -> None:
    """The socket vanishes mid-answer; on a new connection, resume with the last seq seen gives exactly the rest:
    seqs go on from there by one, and the two parts together are the whole text of the same request run whole."""
    whole = await reference(tiny_server, story("ref"))
    a = await Client.connect(tiny_server.ws)
    await a.send(story("g"))
    await read_until_seq(a, "g", 5)
    before = list(a.by_id["g"])
    await a.vanish()
    await asyncio.sleep(0.3)  # the generation goes on meanwhile, with nobody reading

    b = await Client.connect(tiny_server.ws)
    last = before[-1]["seq"]
    await b.send({"type": "resume", "id": "g", "after_seq": last, "session": a.hello["session"]})
    resumed = await b.until(lambda m: m.get("id") == "g")
    assert resumed["type"] == "resumed" and resumed["after_seq"] == last and resumed["running"] is True
    end = await b.finish("g")
    assert end["type"] == "complete" and end["finish_reason"] == "length"
    after = b.by_id["g"][1:]  # past the resumed message
    assert seqs(before) == list(range(last + 1))
    assert seqs(after) == list(range(last + 1, last + 1 + len(after)))
    assert text_of(before) + text_of(after) == whole
    assert end["usage"]["completion_tokens"] == 600
    assert sum(m.get("tokens", 0) for m in before + after) == 600
    await b.close()


async def test_an_orphaned_generation_is_paused_and_a_resume_continues_it_to_its_complete(
    tiny_server: RunningServer,
) -> None:
    """The client vanishes: its generation is paused (it computes nothing, counted in /v1/stats and /metrics) and
    kept. A resume replays what was made and the generation goes on to its complete, the text whole; a resume
    with after_seq -1 (the default) replays from started."""
    whole = await reference(tiny_server, story("short-ref", max_tokens=40))
    a = await Client.connect(tiny_server.ws)
    await a.send(story("short", max_tokens=40))
    await read_until_seq(a, "short", 1)
    seen = a.by_id["short"][-1]["seq"]
    await a.vanish()
    engine: dict[str, int] = {}
    for _ in range(200):  # until it is paused
        engine = tiny_server.get_json("/v1/stats")["engine"]
        if engine["paused"] == 1 and engine["running"] == 0:
            break
        await asyncio.sleep(0.05)
    assert engine["paused"] == 1 and engine["running"] == 0
    assert tiny_server.metrics()["tokenwire_num_requests_paused"] == 1
    assert tiny_server.metrics()["tokenwire_flow_pauses_total"] >= 1
    if engine["backend"] == "transformers":  # its KV is kept out of the batch (OpenVINO: in its prefix cache)
        assert engine["kv_cache_tokens_paused"] > 0
        assert tiny_server.metrics()["tokenwire_kv_cache_paused_tokens"] == engine["kv_cache_tokens_paused"]

    b = await Client.connect(tiny_server.ws)
    await b.send({"type": "resume", "id": "short", "after_seq": seen})
    resumed = await b.until(lambda m: m.get("id") == "short")
    assert resumed["running"] is True
    end = await b.finish("short")
    assert end["type"] == "complete"
    rest = b.by_id["short"][1:]
    assert seqs(rest)[0] == seen + 1 and seqs(rest) == list(range(seen + 1, end["seq"] + 1))
    assert tiny_server.get_json("/v1/stats")["engine"]["kv_cache_tokens_paused"] == 0  # used, or freed at its end

    await b.send({"type": "resume", "id": "short"})  # again, from the start: a resume may be repeated
    await b.until(lambda m: m.get("id") == "short" and m["type"] == "complete" and m is not end)
    replay = [m for m in b.by_id["short"][len(rest) + 2 :]]
    assert replay[0]["type"] == "started" and seqs(replay) == list(range(end["seq"] + 1))
    assert text_of(replay) == whole
    await b.close()


async def keep_reading(client: Client) -> None:
    """Read (and record) whatever comes, until cancelled."""
    while True:
        await client.recv(timeout=120)


async def test_resume_takes_a_generation_over_from_a_connection_still_open(tiny_server: RunningServer) -> None:
    """A half-open socket: the client reconnects while the server still holds the old connection. The resume, with
    the resume_token of the started message, moves the generation: the new connection gets the rest, the old one
    nothing more of it; cancel works there."""
    # On a fast engine (the tiny model makes ~1,000 tokens/s on OpenVINO) the 3,000 tokens can all be made before
    # the resume arrives on a busy 2-core machine. Then the generation legitimately ended: check that it did so
    # whole, and try again (at most 3 times) until the takeover meets it running.
    for attempt in range(3):
        gid = "move" if attempt == 0 else f"move{attempt}"
        a = await Client.connect(tiny_server.ws)
        await a.send(story(gid, max_tokens=3000))
        await read_until_seq(a, gid, 3)
        reading = asyncio.create_task(keep_reading(a))  # a half-open socket's client does not know: it reads on
        token = a.by_id[gid][0]["resume_token"]
        b = await Client.connect(tiny_server.ws)
        resume = {"type": "resume", "id": gid, "after_seq": 3, "session": a.hello["session"], "resume_token": token}
        await b.send(resume)
        resumed = await b.until(lambda m, gid=gid: m.get("id") == gid)
        assert resumed["type"] == "resumed"
        if resumed["running"]:
            break
        whole = await b.finish(gid)
        assert whole["type"] == "complete" and whole["usage"]["completion_tokens"] == 3000, whole
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await a.close()
        await b.close()
    assert resumed["running"] is True, "the generation ended before every resume, 3 times"
    await b.until(lambda m: m.get("id") == gid and m["type"] in ("token", "tokens"))
    await b.send({"type": "cancel", "id": gid})
    end = await b.finish(gid)
    assert end["type"] == "complete" and end["finish_reason"] == "cancelled"
    # a stopped receiving the generation at some seq; b got everything after 3: together each seq at least once
    got_b = seqs(b.by_id[gid][1:])
    assert got_b == list(range(4, end["seq"] + 1))
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await a.send({"type": "ping", "ts": 1})  # a still works, and hears no more of the generation
    await a.until(lambda m: m["type"] == "pong")
    assert all(m["type"] != "complete" for m in a.by_id[gid])
    assert seqs(a.by_id[gid]) == list(range(len(a.by_id[gid])))
    await a.close()
    await b.close()


async def test_without_its_token_no_other_connection_can_take_a_generation_whose_connection_is_open(
    tiny_server: RunningServer,
) -> None:
    """A resume naming another open connection's generation, with no resume_token or a wrong one, is refused: the
    owner keeps receiving it to its complete, and its cancel still works. (It once moved the answer to whoever
    asked, leaving the owner with no end message and a not_found for its cancel.)"""
    owner = await Client.connect(tiny_server.ws)
    thief = await Client.connect(tiny_server.ws)
    try:
        await owner.send(story("mine", max_tokens=3000))
        await read_until_seq(owner, "mine", 2)
        for token in (None, "guess", owner.by_id["mine"][0]["resume_token"][:-1] + "x"):
            msg = {"type": "resume", "id": "mine", "after_seq": -1, "session": owner.hello["session"]}
            await thief.send(msg if token is None else {**msg, "resume_token": token})
            err = await thief.until(lambda m: m.get("id") == "mine")
            assert err["type"] == "error" and err["code"] == "invalid_request" and err["param"] == "resume_token"
        assert all(m["type"] == "error" for m in thief.by_id["mine"])  # not one token of the answer
        await read_until_seq(owner, "mine", 20)
        await owner.send({"type": "cancel", "id": "mine"})
        end = await owner.finish("mine")
        assert end["type"] == "complete" and end["finish_reason"] == "cancelled"
        owner.check_sequence("mine")
        assert tiny_server.metrics()["tokenwire_websocket_resumes_total{outcome=refused}"] >= 3
    finally:
        await owner.close()
        await thief.close()


async def test_resume_of_an_unknown_id_or_a_seq_not_sent_yet_is_an_error_and_the_connection_goes_on(
    tiny_server: RunningServer,
) -> None:
    c = await Client.connect(tiny_server.ws)
    await c.send({"type": "generate", "id": "live", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True})
    await c.until(lambda m: m.get("id") == "live" and m["type"] == "token")
    # all at once, so that the generation (15 s alone) is surely still running when the cancel arrives
    await c.send({"type": "resume", "id": "never-ran", "after_seq": 2})
    await c.send({"type": "resume", "id": "live", "after_seq": 10**9})
    await c.send({"type": "resume", "id": "live", "after_seq": -2})
    await c.send({"type": "cancel", "id": "live"})  # the generation was not disturbed: it can still be cancelled
    end = await c.until(lambda m: m.get("id") == "live" and m["type"] == "complete")
    assert end["finish_reason"] == "cancelled"
    err = c.by_id["never-ran"][0]
    assert err["code"] == "not_found" and err["id"] == "never-ran" and "never-ran" in err["content"]
    errors = [m for m in c.by_id["live"] if m["type"] == "error"]
    assert [(e["code"], e["param"]) for e in errors] == [("invalid_request", "after_seq")] * 2
    stream = [m for m in c.by_id["live"] if m["type"] != "error"]
    assert stream[0]["type"] == "started" and seqs(stream) == list(range(len(stream)))
    await c.close()


async def test_the_same_id_from_two_connections_needs_the_session(tiny_server: RunningServer) -> None:
    """Ids are chosen per connection; when two dropped connections used the same one, resume asks for session."""
    dropped = []
    for _ in range(2):
        c = await Client.connect(tiny_server.ws)
        await c.send(story("twin", max_tokens=2000))
        await read_until_seq(c, "twin", 1)
        await c.vanish()
        dropped.append(c.hello["session"])
    b = await Client.connect(tiny_server.ws)
    await b.send({"type": "resume", "id": "twin", "after_seq": 0})
    err = await b.until(lambda m: m["type"] == "error")
    assert err["code"] == "invalid_request" and err["param"] == "session"
    await b.send({"type": "resume", "id": "twin", "after_seq": 0, "session": dropped[1]})
    assert (await b.until(lambda m: m.get("id") == "twin"))["type"] == "resumed"
    await b.send({"type": "cancel", "id": "twin"})
    end = await b.until(lambda m: m.get("id") == "twin" and m["type"] == "complete")
    assert end["finish_reason"] == "cancelled"
    await b.close()


async def test_a_generation_is_not_resumable_after_a_normal_close_or_past_the_window(
    tiny_server: RunningServer,
) -> None:
    a = await Client.connect(tiny_server.ws)
    await a.send(story("bye", max_tokens=3000))
    await read_until_seq(a, "bye", 1)
    await a.close()  # 1000: the client is done with it
    for _ in range(200):  # the close handshake ends before the server has let go of the connection: wait for that
        connections = tiny_server.get_json("/v1/stats")["connections"]
        if public_ref(a.hello["session"]) not in [c["connection"] for c in connections]:
            break
        await asyncio.sleep(0.02)
    b = await Client.connect(tiny_server.ws)
    await b.send({"type": "resume", "id": "bye", "after_seq": 0, "session": a.hello["session"]})
    assert (await b.until(lambda m: m["type"] == "error"))["code"] == "not_found"

    c = await Client.connect(tiny_server.ws)
    t0 = time.monotonic()  # before it ends: its window cannot open earlier
    await c.send(story("late", max_tokens=20))
    await c.finish("late")
    token = c.by_id["late"][0]["resume_token"]  # the server may not have seen the vanished socket close yet
    await c.vanish()
    while True:  # resumable until the window has passed, not after
        resume = {"type": "resume", "id": "late", "after_seq": 0, "session": c.hello["session"], "resume_token": token}
        await b.send(resume)
        reply = await b.until(lambda m: m.get("id") == "late" and m["type"] in ("resumed", "error"))
        if reply["type"] == "error":
            assert reply["code"] == "not_found"
            break
        await b.until(lambda m: m.get("id") == "late" and m["type"] == "complete")
        assert time.monotonic() - t0 < RESUME_WINDOW + scaled(2.0)
        await asyncio.sleep(0.25)
    assert time.monotonic() - t0 >= RESUME_WINDOW * 0.9
    await b.close()


async def test_only_the_same_api_key_can_resume(tiny_long_model_dir: Path) -> None:
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--api-key", "k1,k2") as server:
        a = await Client.connect(server.ws, subprotocols=["bearer.k1"])
        await a.send(story("mine", max_tokens=400))
        await read_until_seq(a, "mine", 1)
        await a.vanish()
        other = await Client.connect(server.ws, subprotocols=["bearer.k2"])
        await other.send({"type": "resume", "id": "mine", "after_seq": 1, "session": a.hello["session"]})
        assert (await other.until(lambda m: m["type"] == "error"))["code"] == "not_found"
        same = await Client.connect(server.ws, subprotocols=["bearer.k1"])
        await same.send({"type": "resume", "id": "mine", "after_seq": 1, "session": a.hello["session"]})
        assert (await same.until(lambda m: m.get("id") == "mine"))["type"] == "resumed"
        assert (await same.finish("mine"))["type"] == "complete"
        for c in (other, same):
            await c.close()


async def test_resume_is_off_with_a_zero_window(tiny_long_model_dir: Path) -> None:
    """--resume-window 0: a dropped connection aborts its generations at once, and nothing can be resumed."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--resume-window", "0") as server:
        a = await Client.connect(server.ws)
        await a.send(story("g", max_tokens=3000))
        await read_until_seq(a, "g", 1)
        await a.vanish()
        t0 = time.monotonic()
        while server.get_json("/v1/stats")["engine"]["running"]:
            assert time.monotonic() - t0 < scaled(2.0)
            await asyncio.sleep(0.05)
        b = await Client.connect(server.ws)
        await b.send({"type": "resume", "id": "g", "after_seq": 1})
        err = await b.until(lambda m: m["type"] == "error")
        assert err["code"] == "not_found" and "resume is off" in err["content"]
        await b.close()
        metrics = server.metrics()
        assert metrics["tokenwire_websocket_resumes_total{outcome=not_found}"] == 1


async def test_a_client_that_stops_reading_is_dropped_and_can_resume_everything() -> None:
    """A client whose reads stall (tiny receive buffer, nothing read) blocks the server's sends; after the slow
    consumer timeout the server closes it (1008) and orphans the generation, kept paused; a new connection
    resumes it from the start and gets the whole text."""
    rng = random.Random(7)  # incompressible text: permessage-deflate would shrink repeated letters to nothing
    reply = "".join(f"<{i:04d}>" + base64.b64encode(rng.randbytes(12_000)).decode() for i in range(1000))
    engine = FakeEngine(reply=reply, pieces=1000, delay=0.002)
    settings = ServerSettings(heartbeat_interval=0, slow_consumer_timeout=0.5)
    async with serving(engine, settings=settings) as (base, state):
        url = base.replace("http", "ws", 1) + "/ws"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        sock.setblocking(False)
        stuck = await Client.connect(url, sock=sock, max_queue=1)  # websockets stops reading the socket too
        await stuck.send({"type": "generate", "id": "big", "prompt": "x"})
        for _ in range(int(scaled(200))):
            held = [j for j in state.generations.journals() if j.gen_id == "big"]
            if held and held[0].holder is None:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stuck client was never dropped")
        assert not engine.aborted

        fresh = await Client.connect(url)
        await fresh.send({"type": "resume", "id": "big", "session": stuck.hello["session"]})
        end = await fresh.until(lambda m: m.get("id") == "big" and m["type"] == "complete")
        assert end["finish_reason"] == "stop"
        replay = fresh.by_id["big"][1:]
        assert replay[0]["type"] == "started" and seqs(replay) == list(range(len(replay)))
        assert text_of(replay) == reply
        await fresh.close()

        with pytest.raises(websockets.ConnectionClosed) as closed:  # the stuck socket was closed as a policy matter
            for _ in range(10_000):
                await stuck.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert len(stuck.by_id["big"]) < len(replay)  # what the socket buffers held when it was dropped, no more
