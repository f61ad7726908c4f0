"""A small test client: send messages, collect replies by generation id, check the stream invariants."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any, ClassVar

import websockets

from tests.conftest import scaled


class Client:
    open_clients: ClassVar[list[Client]] = []  # closed by the autouse fixture in conftest.py after each test

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        Client.open_clients.append(self)
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.other: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> Client:
        ws = await websockets.connect(url, max_size=None, open_timeout=scaled(10), **kw)
        client = cls(ws)
        hello = await client.recv()
        assert hello["type"] == "hello", hello
        client.hello = hello
        return client

    async def send(self, msg: dict[str, Any] | str) -> None:
        await self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), scaled(timeout))
        msg: dict[str, Any] = json.loads(raw)
        assert "content" in msg and "finished" in msg, msg  # the tutorial's client reads both
        if "id" in msg:
            self.by_id[msg["id"]].append(msg)
        else:
            self.other.append(msg)
        return msg

    async def until(self, pred: Any, timeout: float = 60.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(timeout)
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if pred(msg):
                return msg

    async def finish(self, gen_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the generation's last message (complete or error)."""
        done = [m for m in self.by_id.get(gen_id, []) if m["type"] in ("complete", "error")]
        if done:
            return done[-1]
        return await self.until(lambda m: m.get("id") == gen_id and m["type"] in ("complete", "error"), timeout)

    def text(self, gen_id: str) -> str:
        return "".join(m["content"] for m in self.by_id[gen_id] if m["type"] in ("token", "tokens"))

    def check_sequence(self, gen_id: str) -> None:
        """started is seq 0; every later message of the generation counts up by one; complete is last."""
        msgs = self.by_id[gen_id]
        assert msgs[0]["type"] == "started" and msgs[0]["seq"] == 0
        assert [m["seq"] for m in msgs] == list(range(len(msgs)))
        assert msgs[-1]["type"] == "complete"
        assert all(m["type"] in ("token", "tokens") for m in msgs[1:-1])

    async def close(self) -> None:
        await self.ws.close()

    async def vanish(self) -> None:
        """Drop the TCP connection without a close handshake, as a lost network does; wait until it is gone."""
        self.ws.transport.abort()
        await asyncio.wait_for(self.ws.wait_closed(), scaled(10))
