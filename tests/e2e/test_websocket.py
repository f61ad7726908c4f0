"""The WebSocket protocol over a real socket against a real server process (tiny random model)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.conftest import RESUME_WINDOW
from tests.e2e.server import RunningServer, serving
from tests.fakes import FakeEngine
from tokenwire.config import Settings
from tokenwire.server.running.serve import uvicorn_config

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "000_15d103f118269f62.txt"


def tutorial_page() -> str:
    lines = SEED.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("<!DOCTYPE html>"))
    end = next(i for i, line in enumerate(lines) if line.startswith("</html>"))
    return "".join(lines[start : end + 1])


@pytest.mark.skipif(not SEED.exists(), reason="shared/ is not beside the checkout")
def test_the_tutorials_client_page_is_served_unchanged_at_tutorial(tiny_server: RunningServer) -> None:
    """The tutorial's page (which connects to ws://localhost:8765, the WebSocket at /) is kept as it was."""
    assert tiny_server.get_text("/tutorial") == tutorial_page()
    assert "tokenwire" in tiny_server.get_text("/")  # the chat page


async def test_tutorial_client_messages_get_started_tokens_complete(tiny_server: RunningServer) -> None:
    """Exactly what the tutorial's page sends, on the URL it connects to (ws://host:port, path /)."""
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "prompt": "Hello there", "max_length": 100})
        started = await c.recv()
        assert started["type"] == "started" and started["finished"] is False
        gen_id = started["id"]
        done = await c.finish(gen_id)
        assert done["type"] == "complete" and done["finished"] is True and done["content"] == ""
        c.check_sequence(gen_id)
        usage = done["usage"]
        assert 1 <= usage["completion_tokens"] <= 100
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert set(done["timings"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_second"}
        assert done["finish_reason"] in ("stop", "length")
    finally:
        await c.close()


async def test_the_tokens_of_a_generations_messages_add_up_to_its_completion_tokens(
    tiny_server: RunningServer,
) -> None:
    """Every generated token is counted by exactly one message: a text message covers the tokens of its text, and
    ``complete`` the ones no text covered (the end-of-sequence token, a stop string's, a character left incomplete
    by max_tokens). Checked on a long greedy run and on the same run cut by a stop string from its middle."""
    c = await Client.connect(tiny_server.ws)
    try:

        async def run(gen_id: str, **extra: object) -> tuple[str, dict[str, object]]:
            msg = {"type": "generate", "id": gen_id, "prompt": "Count the stars", "max_tokens": 200}
            await c.send({**msg, "temperature": 0, **extra})
            done = await c.finish(gen_id)
            assert done["type"] == "complete"
            counted = sum(int(m.get("tokens", 0)) for m in c.by_id[gen_id])
            assert counted == done["usage"]["completion_tokens"], (gen_id, counted, done)
            return c.text(gen_id), done

        whole, _ = await run("whole")
        words = [w for w in whole.split() if len(w) >= 3]
        if words:
            stop = words[len(words) // 2]
            cut, done = await run("cut", stop=stop)  # (a repeat may part from the first run at a near-tie)
            assert done["finish_reason"] in ("stop", "length") and stop not in cut
    finally:
        await c.close()


async def test_hello_describes_the_server(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws + "/ws")
    h = c.hello
    assert h["protocol"] == 1 and h["model"] and h["session"] and h["finished"] is False
    assert h["limits"]["max_message_bytes"] == 65536 and h["limits"]["context_tokens"] == 4096
    await c.close()


async def test_generations_are_multiplexed_on_one_connection(tiny_server: RunningServer) -> None:
    """Three generations run at once on one socket without cross-talk: the same seeded request gives the same
    text as when it runs alone on another connection."""
    req = {"type": "generate", "prompt": "Story", "max_tokens": 40, "temperature": 0.8, "seed": 11}
    c = await Client.connect(tiny_server.ws + "/ws")
    try:
        for gid in ("a", "b", "c"):
            await c.send({**req, "id": gid, **({"seed": 12} if gid == "c" else {})})
        for gid in ("a", "b", "c"):
            assert (await c.finish(gid))["type"] == "complete"
            c.check_sequence(gid)
        solo = await Client.connect(tiny_server.ws)
        await solo.send({**req, "id": "solo"})
        await solo.finish("solo")
        await solo.close()
        assert c.text("a") == c.text("b") == solo.text("solo")
        assert c.text("c") != c.text("a")
    finally:
        await c.close()


async def test_batch_coalesces_tokens(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send(
            {
                "type": "generate",
                "id": "b",
                "prompt": "Hi",
                "max_tokens": 40,
                "temperature": 0,
                "batch": {"max_tokens": 5, "max_ms": 10000},
            }
        )
        await c.send({"type": "generate", "id": "u", "prompt": "Hi", "max_tokens": 40, "temperature": 0})
        await c.finish("b")
        await c.finish("u")
        c.check_sequence("b")
        batched = [m for m in c.by_id["b"] if m["type"] == "tokens"]
        assert batched  # (at most 5 tokens each: tests/unit/test_batching.py, and test_default_model.py)
        assert not any(m["type"] == "token" for m in c.by_id["b"])
        assert c.text("b") == c.text("u")  # same greedy text, fewer messages
        assert len(batched) < len([m for m in c.by_id["u"] if m["type"] == "token"])
    finally:
        await c.close()


async def test_batch_max_ms_flushes_on_time(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send(
            {"type": "generate", "id": "t", "prompt": "Hi", "max_tokens": 60, "temperature": 0, "batch": {"max_ms": 1}}
        )
        await c.finish("t")
        c.check_sequence("t")
        assert len([m for m in c.by_id["t"] if m["type"] == "tokens"]) >= 1
    finally:
        await c.close()


BAD_INPUTS: list[tuple[str, str, str | None]] = [
    ("not json at all", "invalid_json", None),
    ("[1, 2, 3]", "invalid_json", None),
    (json.dumps({"prompt": "no type"}), "invalid_request", "type"),
    (json.dumps({"type": "teleport"}), "unknown_type", "type"),
    (json.dumps({"type": "generate"}), "invalid_request", "prompt"),
    (json.dumps({"type": "generate", "prompt": 42}), "invalid_request", "prompt"),
    (json.dumps({"type": "generate", "prompt": "x", "max_tokens": "lots"}), "invalid_request", "max_tokens"),
    (json.dumps({"type": "generate", "prompt": "x", "max_tokens": 10**9}), "invalid_request", "max_tokens"),
    (json.dumps({"type": "generate", "prompt": "x", "temperature": -3}), "invalid_request", "temperature"),
    (
        json.dumps({"type": "generate", "messages": [{"role": "x", "content": "y"}]}),
        "invalid_request",
        "messages[0].role",
    ),
    (json.dumps({"type": "cancel", "id": "nobody"}), "not_found", "id"),
    ('{"type": "generate", "prompt": "bad \\ud800 text"}', "invalid_json", None),
    (json.dumps({"type": "generate", "prompt": "word " * 6000}), "prompt_too_long", None),
]


async def test_each_bad_input_gets_its_error_and_the_connection_and_others_go_on(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "long", "prompt": "Hi", "max_tokens": 200, "temperature": 0.7})
        for raw, code, param in BAD_INPUTS:
            await c.send(raw)
            err = await c.until(lambda m: m["type"] == "error")
            assert err["code"] == code, (raw, err)
            assert err["finished"] is True and isinstance(err["content"], str) and err["content"]
            if param:
                assert err.get("param") == param, (raw, err)
        done = await c.finish("long")
        assert done["type"] == "complete"
        c.check_sequence("long")  # the running generation lost nothing
        await c.send({"type": "generate", "id": "after", "prompt": "Hi", "max_tokens": 5})
        assert (await c.finish("after"))["type"] == "complete"
    finally:
        await c.close()


async def test_a_conversation_over_the_context_fails_or_with_truncate_auto_drops_its_oldest_turns(
    tiny_server: RunningServer,
) -> None:
    history = [{"role": "system", "content": "Be kind."}]
    for i in range(8):
        history.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 700})
    history.append({"role": "user", "content": "And now?"})
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "whole", "messages": history, "max_tokens": 2})
        err = await c.finish("whole")
        assert err["type"] == "error" and err["code"] == "prompt_too_long" and "truncate" in err["content"]
        await c.send({"type": "generate", "id": "cut", "messages": history, "max_tokens": 2, "truncate": "auto"})
        started = await c.until(lambda m: m.get("id") == "cut")
        assert started["type"] == "started" and started["prompt_tokens"] < 4096
        assert 1 <= started["truncated_messages"] < 8  # some of the eight old turns, never the system or last one
        assert (await c.finish("cut"))["type"] == "complete"
        await c.send({"type": "generate", "id": "short", "prompt": "Hi", "max_tokens": 2})
        assert "truncated_messages" not in await c.until(lambda m: m.get("id") == "short")
    finally:
        await c.close()


async def test_duplicate_running_id_is_refused_without_disturbing_the_first(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "same", "prompt": "Hi", "max_tokens": 300, "ignore_eos": True})
        await c.send({"type": "generate", "id": "same", "prompt": "Hi", "max_tokens": 5})
        err = await c.until(lambda m: m["type"] == "error")
        assert err["code"] == "duplicate_id" and err["id"] == "same"
        c.by_id["same"].remove(err)  # the refusal is not part of the first generation's stream
        done = await c.finish("same")
        assert done["type"] == "complete"
        c.check_sequence("same")
        # once finished, the id may be used again
        c.by_id.pop("same")
        await c.send({"type": "generate", "id": "same", "prompt": "Hi", "max_tokens": 3})
        assert (await c.finish("same"))["type"] == "complete"
    finally:
        await c.close()


async def test_cancel_ends_with_complete_cancelled(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "k", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "k" and m["type"] == "token")
        await c.send({"type": "cancel", "id": "k"})
        done = await c.finish("k")
        assert done["type"] == "complete" and done["finish_reason"] == "cancelled"
        c.check_sequence("k")
    finally:
        await c.close()


async def test_frame_over_the_size_limit_closes_with_1009_and_server_goes_on(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    await c.send(json.dumps({"type": "generate", "prompt": "x" * 100_000}))
    with pytest.raises(websockets.ConnectionClosed) as info:
        for _ in range(10):
            await c.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    c2 = await Client.connect(tiny_server.ws)
    await c2.send({"type": "generate", "id": "ok", "prompt": "Hi", "max_tokens": 3})
    assert (await c2.finish("ok"))["type"] == "complete"
    await c2.close()


async def test_ping_is_answered_with_pong_echoing_ts(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    await c.send({"type": "ping", "ts": 12345})
    pong = await c.until(lambda m: m["type"] == "pong")
    assert pong["ts"] == 12345
    await c.send({"type": "pong"})  # accepted silently
    await c.close()


async def test_server_sends_heartbeat_pings(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    ping = await c.until(lambda m: m["type"] == "ping", timeout=5)
    assert ping["finished"] is False and "ts" in ping
    await c.close()


async def test_too_many_generations_on_one_connection_is_rate_limited(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        for i in range(9):  # the fixture allows 8
            await c.send({"type": "generate", "id": f"g{i}", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True})
        err = await c.until(lambda m: m["type"] == "error")
        assert err["code"] == "rate_limited" and err["id"] == "g8"
        for i in range(8):
            await c.send({"type": "cancel", "id": f"g{i}"})
        for i in range(8):  # cancelled at once, also the ones whose prompt was still being tokenized
            end = await c.finish(f"g{i}", timeout=10)
            assert end["type"] == "complete" and end["finish_reason"] == "cancelled", end
    finally:
        await c.close()


async def test_dropped_connections_are_paused_for_the_resume_window_then_ended(
    tiny_server: RunningServer,
) -> None:
    """32 streams decoding; every connection vanishes. Their generations are paused at once (out of the batch, a
    client may resume them) and kept until the resume window has passed, then ended: none is left within 2 s of
    the window's end."""
    clients = [await Client.connect(tiny_server.ws) for _ in range(32)]
    for i, c in enumerate(clients):
        await c.send(
            {
                "type": "generate",
                "id": f"s{i}",
                "prompt": "Tell me a long story",
                "max_tokens": 4000,
                "ignore_eos": True,
            }
        )
    for i, c in enumerate(clients):
        await c.until(lambda m, i=i: m.get("id") == f"s{i}" and m["type"] == "token")
    assert tiny_server.get_json("/v1/stats")["engine"]["running"] > 0
    t0 = time.monotonic()  # before the drops: the server cannot start a window before it sees one
    for c in clients:
        await c.vanish()  # no close handshake: the client just vanishes
    await asyncio.sleep(RESUME_WINDOW / 2 - (time.monotonic() - t0))
    stats = tiny_server.get_json("/v1/stats")
    assert stats["engine"]["paused"] == 32 and stats["engine"]["running"] == 0, stats["engine"]
    assert stats["orphaned_generations"] == 32
    while True:
        engine = tiny_server.get_json("/v1/stats")["engine"]
        if engine["running"] == 0 and engine["waiting"] == 0 and engine["paused"] == 0:
            break
        assert time.monotonic() - t0 < RESUME_WINDOW + scaled(2.0), engine
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 >= RESUME_WINDOW * 0.9  # not aborted before the window ended
    assert tiny_server.get_json("/v1/stats")["orphaned_generations"] == 0


async def test_a_normal_close_aborts_the_connections_generations_at_once(tiny_server: RunningServer) -> None:
    """A client that closes with 1000 is done with its generations: they stop within 2 s, window or not."""
    clients = [await Client.connect(tiny_server.ws) for _ in range(4)]
    for c in clients:
        await c.send({"type": "generate", "id": "g", "prompt": "Go on", "max_tokens": 4000, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "g" and m["type"] == "token")
    for c in clients:
        await c.close()
    t0 = time.monotonic()
    while True:
        stats = tiny_server.get_json("/v1/stats")
        if stats["engine"]["running"] == 0 and stats["engine"]["waiting"] == 0:
            break
        assert time.monotonic() - t0 < scaled(2.0), stats["engine"]
        await asyncio.sleep(0.05)
    assert stats["orphaned_generations"] == 0


@pytest.mark.parametrize(("compression", "negotiated"), [("deflate", True), ("none", False)])
async def test_ws_compression_decides_whether_permessage_deflate_is_negotiated(
    compression: str, negotiated: bool
) -> None:
    """Browsers offer permessage-deflate; --ws-compression none declines it (less memory and CPU per socket,
    more bytes on the wire: bench/results/ab-compression-tiny-cpu.md)."""
    async with serving(FakeEngine(), server_settings=Settings(ws_compression=compression)) as (base, _):
        ws = await websockets.connect(base.replace("http", "ws", 1) + "/ws", compression="deflate")
        try:
            assert json.loads(await ws.recv())["type"] == "hello"
            accepted = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            assert (accepted is not None and "permessage-deflate" in accepted) is negotiated
        finally:
            await ws.close()


def test_an_unknown_ws_compression_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--ws-compression must be deflate or none, not 'gzip'"):
        uvicorn_config(Settings(ws_compression="gzip"), None)
