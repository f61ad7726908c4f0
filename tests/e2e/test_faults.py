"""Faults: an engine that stops working is noticed, said, and ends the process so that its supervisor restarts it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import serve, serving
from tests.fakes import FakeEngine


async def test_an_engine_that_fails_turns_ready_503_and_stops_the_server() -> None:
    """The engine reports a failure (its loop died or hangs): /ready answers 503 "failed" with the cause, and the
    server asks to stop (on_fatal), as ``tokenwire serve`` does to exit non-zero."""
    engine = FakeEngine()
    fatal = asyncio.Event()
    async with serving(engine, on_fatal=fatal.set) as (base, state), httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/ready")).status_code == 200
        engine.failure = "the model loop has not finished a step for 121 s: it hangs"
        await asyncio.wait_for(fatal.wait(), scaled(5))
        r = await http.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "hangs" in r.json()["error"]
        assert state.engine_error is not None


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


async def test_a_worker_that_keeps_dying_ends_the_process_with_a_non_zero_code(tiny_gguf: Path) -> None:
    """OpenVINO engine: each killed worker fails its request (generation_failed) and is restarted; after the
    fourth death in five minutes the engine gives up, /ready turns 503 and ``tokenwire serve`` exits with 1."""
    with serve("--engine", "openvino", "--model", str(tiny_gguf), "--device", "cpu") as server:
        c = await Client.connect(server.ws)
        for attempt in range(4):
            deadline = time.monotonic() + scaled(60)
            while not children(server.proc.pid) or not server.get_json("/v1/stats")["ready"]:
                assert time.monotonic() < deadline, "the worker did not come back"
                await asyncio.sleep(0.1)
            gen = {"type": "generate", "id": f"g{attempt}", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}
            await c.send(gen)
            await c.until(lambda m, a=attempt: m.get("id") == f"g{a}" and m["type"] == "token")
            for pid in children(server.proc.pid):
                os.kill(pid, signal.SIGKILL)
            end = await c.finish(f"g{attempt}", timeout=60)
            assert end["type"] == "error" and end["code"] == "generation_failed", end
        assert server.proc.wait(timeout=scaled(60)) == 1
