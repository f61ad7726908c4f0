"""A bounded live fuzz of the WebSocket, Realtime and HTTP doors (scripted engine, fixed seed): random frames and
bodies built from the protocols' own fields never close a connection, never get a 500, and afterwards the same
connection still serves a normal request. Every generation the server started ended with complete or error."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import websockets

from tests.e2e.client import Client
from tests.e2e.server import serving
from tests.fakes import FakeEngine
from tokenwire.server.settings import ServerSettings

FIELDS = [
    "type", "id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "raw", "truncate", "batch", "after_seq", "session", "resume_token", "ignore_eos", "model", "stream",
    "event_id", "item", "response", "role", "content", "text",
]  # fmt: skip
TYPES = ["generate", "cancel", "ping", "pong", "resume", "session.update", "conversation.item.create",
         "response.create", "response.cancel", "bogus"]  # fmt: skip


def value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 3 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**70), 10**400 if rng.random() < 0.1 else 7])
    if pick == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e308, 0.7, 2.5])
    if pick in (4, 5, 6):
        return rng.choice(["", "x", "user", "generate", "\u00e9\u65e5\U0001f600", "a" * rng.randrange(200), "\ud800"])
    if pick in (7, 8):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): value(rng, depth + 1) for _ in range(rng.randrange(5))}


def frame(rng: random.Random) -> str | bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    obj: dict[str, Any] = {rng.choice(FIELDS): value(rng) for _ in range(rng.randrange(6))}
    if kind > 2:
        obj["type"] = rng.choice(TYPES)
    text = json.dumps(obj)
    if kind == 1:
        return text[: rng.randrange(len(text) + 1)]  # cut short
    return text


async def test_random_websocket_frames_never_break_the_connection_or_the_server() -> None:
    rng = random.Random(20261126)
    engine = FakeEngine(reply="ok ok", pieces=2)
    settings = ServerSettings(heartbeat_interval=0)
    async with serving(engine, settings=settings) as (base, _), httpx.AsyncClient(base_url=base) as http:
        c = await Client.connect(base.replace("http", "ws", 1) + "/ws")
        for _ in range(300):
            await c.ws.send(frame(rng))
        await c.send({"type": "ping", "ts": "end"})
        await c.until(lambda m: m["type"] == "pong" and m.get("ts") == "end", timeout=30)
        await asyncio.sleep(0.2)  # generations the fuzz started end
        for gen_id, msgs in c.by_id.items():
            if msgs[0]["type"] == "started":
                assert msgs[-1]["type"] in ("complete", "error"), (gen_id, msgs[-1])
        await c.send({"type": "generate", "id": "after-fuzz", "prompt": "hi"})
        assert (await c.finish("after-fuzz"))["type"] == "complete"
        assert (await http.get("/health")).status_code == 200
        await c.close()

        async with websockets.connect(base.replace("http", "ws", 1) + "/v1/realtime") as rt:
            assert json.loads(await rt.recv())["type"] == "session.created"
            for _ in range(200):
                await rt.send(frame(rng))
            await rt.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "none", "event_id": "last"}))
            while True:
                ev = json.loads(await asyncio.wait_for(rt.recv(), 30))
                if ev.get("type") == "error" and ev["error"].get("event_id") == "last":
                    break


async def test_random_http_bodies_get_a_client_error_or_an_answer_never_a_500() -> None:
    rng = random.Random(7)
    async with serving(FakeEngine(reply="ok", pieces=1)) as (base, _), httpx.AsyncClient(base_url=base) as http:
        for i in range(200):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body = frame(rng)
            r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.headers.get("content-type", "").startswith("application/json"):
                r.json()
        ok = await http.post("/v1/completions", json={"model": "fake-model", "prompt": "hi"})
        assert ok.status_code == 200
