"""The operator's broadcast: POST /v1/admin/broadcast with the admin key sends a notice to every open WebSocket."""

from __future__ import annotations

import httpx

from tests.e2e.client import Client
from tests.e2e.server import serving
from tests.fakes import FakeEngine
from tokenwire.server.admission.auth import AuthPolicy


async def test_the_admin_key_sends_a_notice_to_every_websocket() -> None:
    """Two sockets hear the notice (type notice, level, content); the answer says how many got it; a generation
    running on one of them goes on untouched."""
    engine = FakeEngine(reply="word " * 40, pieces=40, delay=0.01)
    async with serving(engine, admin_key="admin-secret") as (base, _), httpx.AsyncClient(base_url=base) as http:
        ws = base.replace("http", "ws", 1) + "/ws"
        a, b = await Client.connect(ws), await Client.connect(ws)
        await a.send({"type": "generate", "id": "g", "prompt": "Hi"})
        await a.until(lambda m: m.get("id") == "g" and m["type"] == "token")
        r = await http.post(
            "/v1/admin/broadcast",
            json={"message": "Maintenance at 18:00 UTC", "level": "warning"},
            headers={"Authorization": "Bearer admin-secret"},
        )
        assert r.status_code == 200 and r.json() == {"delivered": 2}
        for c in (a, b):
            notice = await c.until(lambda m: m["type"] == "notice")
            assert notice["content"] == "Maintenance at 18:00 UTC" and notice["level"] == "warning"
            assert notice["code"] == "broadcast" and notice["finished"] is False and "id" not in notice
        end = await a.finish("g")
        assert end["type"] == "complete" and a.text("g") == engine.reply
        await a.close()
        await b.close()


async def test_broadcast_needs_the_admin_key_and_a_valid_body() -> None:
    """Off without --admin-key (404); an API key or a wrong key is 401; a bad body is 400 naming the field."""
    async with serving(FakeEngine()) as (base, _), httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/v1/admin/broadcast", json={"message": "x"})
        assert r.status_code == 404 and "--admin-key" in r.json()["error"]["message"]
    policy = AuthPolicy(api_keys=("user-key",))
    async with (
        serving(FakeEngine(), auth=policy, admin_key="admin-secret") as (base, _),
        httpx.AsyncClient(base_url=base) as http,
    ):
        for key in (None, "user-key", "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = await http.post("/v1/admin/broadcast", json={"message": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", key
        admin = {"Authorization": "Bearer admin-secret"}
        for body, field in (
            ({}, "message"),
            ({"message": ""}, "message"),
            ({"message": "x", "level": "loud"}, "level"),
        ):
            r = await http.post("/v1/admin/broadcast", json=body, headers=admin)
            assert r.status_code == 400 and f'"{field}"' in r.json()["error"]["message"], body
        r = await http.post("/v1/admin/broadcast", content=b"not json", headers=admin)
        assert r.status_code == 400
        r = await http.post("/v1/admin/broadcast", json={"message": "hello"}, headers=admin)
        assert r.status_code == 200 and r.json() == {"delivered": 0}
