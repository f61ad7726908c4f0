"""Many idle WebSocket connections on one process: memory per connection, descriptors, heartbeats still answered.

Starts ``tokenwire serve`` (a scripted-free real server on the default model; the model does not matter for idle
sockets, ``--model`` picks another), opens N WebSockets from this process in batches, holds them for a few
heartbeat intervals, and reports: the server's resident memory and open descriptors before and after (per
connection), how many connections got a server ``ping`` while held (heartbeats reach every one), how long
``/health`` and a ``ping``/``pong`` round trip take with all of them open, and the ``ulimit -n`` this needs.

    python bench/idle.py --connections 10000 --out bench/results/idle-10k-cpu.json

Only 127.0.0.1; bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from compare import BENCH, free_port, start, stop, wait_ready


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=30) as r:
        return dict(json.loads(r.read()))


def health_ms(port: int) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        r.read()
    return (time.perf_counter() - t0) * 1000


class Holder:
    """One idle connection that reads what the server sends (hello, heartbeats) and counts the pings."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pings = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if json.loads(raw).get("type") == "ping":
                    self.pings += 1
        except Exception:
            return


async def open_many(url: str, n: int, batch: int) -> list[Holder]:
    holders: list[Holder] = []
    while len(holders) < n:
        take = min(batch, n - len(holders))
        conns = await asyncio.gather(
            *(connect(url, max_size=None, open_timeout=60, ping_interval=None) for _ in range(take))
        )
        holders += [Holder(ws) for ws in conns]
    return holders


async def round_trip_ms(url: str) -> float:
    async with connect(url) as ws:
        await ws.recv()  # hello
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "ping", "ts": 1}))
        while json.loads(await ws.recv()).get("type") != "pong":
            pass
        return (time.perf_counter() - t0) * 1000


async def measure(port: int, n: int, batch: int, hold: float) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws"
    before = stats(port)["process"]
    t0 = time.monotonic()
    holders = await open_many(url, n, batch)
    opened_s = time.monotonic() - t0
    await asyncio.sleep(hold)
    held = stats(port)
    after = held["process"]
    rtt = [await round_trip_ms(url) for _ in range(5)]
    health = [await asyncio.to_thread(health_ms, port) for _ in range(5)]
    pinged = sum(1 for h in holders if h.pings > 0)
    for h in holders:
        await h.ws.close()
    await asyncio.gather(*(h.task for h in holders), return_exceptions=True)
    return {
        "connections": n,
        "open_s": round(opened_s, 1),
        "server_connections_seen": held["active_connections"],
        "rss_mb_before": before["rss_mb"],
        "rss_mb_after": after["rss_mb"],
        "kb_per_connection": round((after["rss_mb"] - before["rss_mb"]) * 1024 / n, 1),
        "fds_before": before["open_fds"],
        "fds_after": after["open_fds"],
        "tasks_after": after["tasks"],
        "connections_that_got_a_heartbeat": pinged,
        "ping_pong_ms_median": round(statistics.median(rtt), 2),
        "health_ms_median": round(statistics.median(health), 2),
        "ulimit_n_needed": after["open_fds"] + 64,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--heartbeat", type=float, default=5.0, help="the server's --heartbeat-interval")
    p.add_argument("--hold", type=float, default=12.0, help="seconds to hold them all open")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"idle-{stamp}.json"
    port = free_port()
    argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port)]
    argv_tw += ["--heartbeat-interval", str(a.heartbeat)] + (["--model", a.model] if a.model else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = start(argv_tw, out.with_suffix(".log"), env)
    try:
        wait_ready(proc, port, True, out.with_suffix(".log"))
        result = asyncio.run(measure(port, a.connections, a.batch, a.hold))
    finally:
        stop(proc)
    result.update(date=stamp, hard_limit=hard, heartbeat_s=a.heartbeat, held_s=a.hold)
    out.write_text(json.dumps(result, indent=1))
    lines = ["# Idle WebSocket connections on one process (bench/idle.py)", ""]
    lines += [f"| {k} | {v} |" for k, v in result.items()]
    out.with_suffix(".md").write_text("\n".join(["| what | value |", "|---|---|", *lines[2:]]) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
