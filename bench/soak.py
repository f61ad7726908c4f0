"""Soak: minutes of mixed traffic against one server, then the books: requests accepted = requests ended, and no
growth in memory, tasks, engine rows or file descriptors.

Workers, each looping until the deadline (every wait bounded):

- ``reader``: generate, read to the end, check every seq once and in order;
- ``dropper``: generate, read a little, vanish (no close handshake), reconnect after up to 2 s, ``resume`` from the
  last seq seen, read to the end: the whole generation, nothing repeated;
- ``canceller``: generate, cancel after a few tokens: ``complete`` with ``cancelled``;
- ``slow``: a 4 KiB receive buffer and a pause between reads (the server merges its messages and pauses it);
- ``garbage``: bad frames (not JSON, wrong fields, huge numbers, cut JSON) and then a valid request on the same socket;
- ``sse``: OpenAI streaming requests, one in three dropped half-way.

A generation counts as *accepted* when its ``started`` arrives and *ended* when its ``complete`` or ``error`` does
(after a resume for droppers). The server's /v1/stats ``process`` (RSS, descriptors, tasks) and ``engine`` rows
are read before, and after a quiet period that outlasts the resume window.

    python bench/soak.py --minutes 3 --out bench/results/soak-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from compare import BENCH, free_port, start, stop, wait_ready

PROMPTS = ["Tell me a story.", "What is the capital of France?", "Write a poem about the sea.", "Count to ten."]


class Books:
    def __init__(self) -> None:
        self.accepted = Counter[str]()
        self.ended = Counter[str]()
        self.problems: list[str] = []


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=30) as r:
        return dict(json.loads(r.read()))


async def recv(ws: ClientConnection, timeout: float = 120) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


def gen(gen_id: str, rng: random.Random, max_tokens: int | None = None) -> str:
    return json.dumps(
        {
            "type": "generate",
            "id": gen_id,
            "prompt": rng.choice(PROMPTS),
            "max_tokens": max_tokens or rng.randint(16, 160),
        }
    )


async def follow(ws: ClientConnection, gen_id: str, books: Books, kind: str, first_seq: int = 0) -> dict[str, Any]:
    """Read ``gen_id``'s messages to its end, checking seq; returns the last message."""
    expected = first_seq
    while True:
        msg = await recv(ws)
        if msg.get("id") != gen_id or msg["type"] == "resumed":
            continue
        if msg["type"] == "started":
            books.accepted[kind] += 1
        if "seq" in msg:
            if msg["seq"] != expected:
                books.problems.append(f"{kind} {gen_id}: seq {msg['seq']} where {expected} was due")
            expected = msg["seq"] + 1
        if msg["type"] in ("complete", "error"):
            books.ended[kind] += 1
            return msg


async def reader(url: str, books: Books, rng: random.Random, n: int) -> None:
    async with connect(url, max_size=None) as ws:
        await recv(ws)
        await ws.send(gen(f"r{n}", rng))
        await follow(ws, f"r{n}", books, "reader")


async def dropper(url: str, books: Books, rng: random.Random, n: int) -> None:
    gen_id = f"d{n}"
    ws = await connect(url, max_size=None)
    session = (await recv(ws))["session"]
    await ws.send(gen(gen_id, rng, rng.randint(60, 200)))
    last, target = -1, rng.randint(1, 8)
    while last < target:
        msg = await recv(ws)
        if msg.get("id") == gen_id:
            if msg["type"] == "started":
                books.accepted["dropper"] += 1
            last = msg["seq"]
            if msg["type"] in ("complete", "error"):
                books.ended["dropper"] += 1
                await ws.close()
                return
    ws.transport.abort()
    await asyncio.sleep(rng.uniform(0, 2))
    async with connect(url, max_size=None) as again:
        await recv(again)
        await again.send(json.dumps({"type": "resume", "id": gen_id, "session": session, "after_seq": last}))
        await follow(again, gen_id, books, "dropper", first_seq=last + 1)


async def canceller(url: str, books: Books, rng: random.Random, n: int) -> None:
    async with connect(url, max_size=None) as ws:
        await recv(ws)
        await ws.send(gen(f"c{n}", rng, 400))
        tokens = 0
        while True:
            msg = await recv(ws)
            if msg["type"] == "started":
                books.accepted["canceller"] += 1
            elif msg["type"] == "token":
                tokens += 1
                if tokens == 3:
                    await ws.send(json.dumps({"type": "cancel", "id": f"c{n}"}))
            elif msg["type"] in ("complete", "error"):
                books.ended["canceller"] += 1
                return


async def slow(url: str, port: int, books: Books, rng: random.Random, n: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    async with connect(url, sock=sock, max_size=None, max_queue=1) as ws:
        await recv(ws)
        await ws.send(gen(f"s{n}", rng, 300))
        while True:
            msg = await recv(ws)
            await asyncio.sleep(0.02)
            if msg.get("type") == "started":
                books.accepted["slow"] += 1
            if msg.get("type") in ("complete", "error"):
                books.ended["slow"] += 1
                return


async def garbage(url: str, books: Books, rng: random.Random, n: int) -> None:
    frames = ["{", "[]", "null", '{"type": 7}', '{"type": "generate", "max_tokens": 1e999}', "\x00" * 10,
              '{"type": "generate", "prompt": "x", "temperature": -1}', '{"type": "resume", "id": "nope"}',
              '{"type": "cancel"}', json.dumps({"type": "generate", "messages": [{"role": "x"}] * 3})]  # fmt: skip
    async with connect(url, max_size=None) as ws:
        await recv(ws)
        for f in rng.sample(frames, 5):
            await ws.send(f)
        await ws.send(gen(f"g{n}", rng, 20))
        await follow(ws, f"g{n}", books, "garbage")


async def sse(base: str, books: Books, rng: random.Random, n: int, model: str) -> None:
    drop = rng.random() < 0.33
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
            "max_tokens": rng.randint(16, 120)}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=base, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        if r.status_code != 200:
            books.problems.append(f"sse: HTTP {r.status_code}")
            return
        books.accepted["sse"] += 1
        chunks = 0
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                books.ended["sse"] += 1
                return
            chunks += line.startswith("data:")
            if drop and chunks > 3:
                books.ended["sse"] += 1  # the client ends it: the server aborts it
                return


async def worker(
    kind: str, deadline: float, url: str, port: int, base: str, model: str, books: Books, seed: int
) -> None:
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            if kind == "reader":
                await reader(url, books, rng, n)
            elif kind == "dropper":
                await dropper(url, books, rng, n)
            elif kind == "canceller":
                await canceller(url, books, rng, n)
            elif kind == "slow":
                await slow(url, port, books, rng, n)
            elif kind == "garbage":
                await garbage(url, books, rng, n)
            else:
                await sse(base, books, rng, n, model)
        except Exception as exc:
            books.problems.append(f"{kind}: {type(exc).__name__}: {exc}")


async def soak(port: int, minutes: float, quiet: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    url = f"ws://127.0.0.1:{port}/ws"
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    before = stats(port)
    books = Books()
    deadline = time.monotonic() + minutes * 60
    kinds = ["reader", "reader", "dropper", "dropper", "canceller", "slow", "garbage", "sse", "sse"]
    await asyncio.gather(*(worker(k, deadline, url, port, base, model, books, i) for i, k in enumerate(kinds)))
    await asyncio.sleep(quiet)  # past the resume window: nothing may be left
    after = stats(port)
    return {
        "minutes": minutes,
        "accepted": dict(books.accepted),
        "ended": dict(books.ended),
        "accepted_equals_ended": books.accepted == books.ended,
        "problems": books.problems[:50],
        "problem_count": len(books.problems),
        "before": {
            "process": before["process"],
            "engine": before["engine"],
            "connections": before["active_connections"],
        },
        "after": {
            "process": after["process"],
            "engine": after["engine"],
            "connections": after["active_connections"],
            "resumable": after["resumable_generations"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--resume-window", type=float, default=10.0)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"soak-{stamp}.json"
    port = free_port()
    argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port)]
    argv_tw += ["--resume-window", str(a.resume_window)] + (["--model", a.model] if a.model else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = start(argv_tw, out.with_suffix(".log"), env)
    try:
        wait_ready(proc, port, True, out.with_suffix(".log"))
        result = asyncio.run(soak(port, a.minutes, a.resume_window + 5))
    finally:
        stop(proc)
    result["date"] = stamp
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["accepted_equals_ended"] and not result["problem_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
