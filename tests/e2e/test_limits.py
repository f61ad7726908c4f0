"""Connection and per-key limits over a real server (scripted engine): each refuses with a clear error and the
code or status its door uses, and frees its place when the holder goes."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from tests.e2e.client import Client
from tests.e2e.server import serving
from tests.fakes import FakeEngine
from tokenwire.config import Settings
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.settings import ServerSettings


async def refused(url: str, **kw: object) -> tuple[dict[str, object], int | None]:
    ws = await websockets.connect(url, **kw)  # type: ignore[arg-type]
    first = json.loads(await ws.recv())
    with pytest.raises(websockets.ConnectionClosed) as info:
        await ws.recv()
    return first, info.value.rcvd.code if info.value.rcvd is not None else None


async def test_connections_per_address_are_capped_for_websockets_and_http() -> None:
    """Two places per address: a third WebSocket gets overloaded naming the flag and close 1013, an HTTP request
    503 with Retry-After; closing one frees a place."""
    settings = ServerSettings(heartbeat_interval=0, max_connections_per_ip=2)
    async with serving(FakeEngine(), settings=settings) as (base, _), httpx.AsyncClient(base_url=base) as http:
        ws_url = base.replace("http", "ws", 1) + "/ws"
        a, b = await Client.connect(ws_url), await Client.connect(ws_url)
        first, code = await refused(ws_url)
        assert first["code"] == "overloaded" and "--max-connections-per-ip" in str(first["content"]) and code == 1013
        r = await http.get("/v1/models")
        assert r.status_code == 503 and "--max-connections-per-ip" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert (await http.get("/ready")).status_code == 200  # probes always pass
        await a.close()
        c = await Client.connect(ws_url)
        await b.close()
        await c.close()


async def test_behind_a_trusted_proxy_the_forwarded_address_counts() -> None:
    """From a trusted proxy (127.0.0.1 by default) X-Forwarded-For names the client: two clients behind it get
    their own places. With no trusted proxy the header is ignored and both count as the proxy."""
    settings = ServerSettings(heartbeat_interval=0, max_connections_per_ip=1)
    async with serving(FakeEngine(), settings=settings) as (base, _):
        url = base.replace("http", "ws", 1) + "/ws"
        one = await Client.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
        two = await Client.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.2"})
        first, code = await refused(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
        assert first["code"] == "overloaded" and code == 1013
        await one.close()
        await two.close()
    flags = Settings(trusted_proxies="192.0.2.1")
    async with serving(FakeEngine(), settings=settings, server_settings=flags) as (base, _):
        url = base.replace("http", "ws", 1) + "/ws"
        one = await Client.connect(url, additional_headers={"X-Forwarded-For": "10.0.0.1"})
        first, code = await refused(url, additional_headers={"X-Forwarded-For": "10.0.0.2"})
        assert first["code"] == "overloaded" and code == 1013
        await one.close()


async def test_an_api_key_runs_at_most_its_cap_of_generations_over_all_its_connections_and_doors() -> None:
    """Two generations per key: a third on another connection of the same key is rate_limited, an HTTP request
    of that key 429 with Retry-After; another key is not affected; when one ends, the key may start another."""
    engine = FakeEngine(reply="word " * 100, pieces=100, delay=0.02)
    settings = ServerSettings(heartbeat_interval=0, max_generations_per_key=2)
    policy = AuthPolicy(api_keys=("k1", "k2"))
    async with serving(engine, settings=settings, auth=policy) as (base, _), httpx.AsyncClient(base_url=base) as http:
        url = base.replace("http", "ws", 1) + "/ws"
        a = await Client.connect(url, subprotocols=["bearer.k1"])
        b = await Client.connect(url, subprotocols=["bearer.k1"])
        other = await Client.connect(url, subprotocols=["bearer.k2"])
        await a.send({"type": "generate", "id": "g1", "prompt": "x"})
        await a.send({"type": "generate", "id": "g2", "prompt": "x"})
        await a.until(lambda m: m.get("id") == "g2" and m["type"] == "started")
        await b.send({"type": "generate", "id": "g3", "prompt": "x"})
        err = await b.until(lambda m: m.get("id") == "g3")
        assert (
            err["type"] == "error" and err["code"] == "rate_limited" and "--max-generations-per-key" in err["content"]
        )
        r = await http.post(
            "/v1/completions",
            json={"model": "fake-model", "prompt": "x", "max_tokens": 5},
            headers={"Authorization": "Bearer k1"},
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and "retry-after" in r.headers
        await other.send({"type": "generate", "id": "o", "prompt": "x"})
        assert (await other.finish("o"))["type"] == "complete"
        await a.send({"type": "cancel", "id": "g1"})
        await a.finish("g1")
        await b.send({"type": "generate", "id": "g4", "prompt": "x"})
        assert (await b.until(lambda m: m.get("id") == "g4"))["type"] == "started"
        for c in (a, b, other):
            await c.close()


async def test_the_per_key_token_budget_refuses_with_the_wait_until_it_refills() -> None:
    """A budget of 30 tokens a minute: after a generation of 7 prompt + 30 generated tokens the key is refused
    (rate_limited with retry_after_s on the WebSocket, 429 with Retry-After over HTTP); another key is not."""
    engine = FakeEngine(reply="w" * 30, pieces=30)
    settings = ServerSettings(heartbeat_interval=0, rate_limit_tokens_per_minute=30)
    policy = AuthPolicy(api_keys=("k1", "k2"))
    async with serving(engine, settings=settings, auth=policy) as (base, _), httpx.AsyncClient(base_url=base) as http:
        url = base.replace("http", "ws", 1) + "/ws"
        c = await Client.connect(url, subprotocols=["bearer.k1"])
        await c.send({"type": "generate", "id": "g1", "prompt": "x"})
        assert (await c.finish("g1"))["type"] == "complete"
        await c.send({"type": "generate", "id": "g2", "prompt": "x"})
        err = await c.finish("g2")
        assert err["code"] == "rate_limited" and "--rate-limit" in err["content"]
        assert 10 <= err["retry_after_s"] <= 20  # 7 tokens in debt, refilled at half a token a second: 16 s
        r = await http.post(
            "/v1/completions",
            json={"model": "fake-model", "prompt": "x", "max_tokens": 5},
            headers={"Authorization": "Bearer k1"},
        )
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        r = await http.post(
            "/v1/completions",
            json={"model": "fake-model", "prompt": "x", "max_tokens": 5},
            headers={"Authorization": "Bearer k2"},
        )
        assert r.status_code == 200
        await c.close()
