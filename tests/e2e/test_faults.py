"""Faults: an engine that stops working is noticed, said, and ends the process so that its supervisor restarts it."""

from __future__ import annotations

import asyncio
import json
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
    """OpenVINO engine: a killed worker is restarted and the request it held goes on to its end (another request
    each time, so none is blamed); at the fourth death in five minutes the engine gives up: that request fails
    with generation_failed, /ready turns 503 and ``tokenwire serve`` exits with 1."""
    with serve("--engine", "openvino", "--model", str(tiny_gguf), "--device", "cpu") as server:
        c = await Client.connect(server.ws)
        for attempt in range(4):
            deadline = time.monotonic() + scaled(60)
            while not children(server.proc.pid) or not server.get_json("/v1/stats")["ready"]:
                assert time.monotonic() < deadline, "the worker did not come back"
                await asyncio.sleep(0.1)
            gen = {"type": "generate", "id": f"g{attempt}", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True}
            await c.send(gen)
            await c.until(lambda m, a=attempt: m.get("id") == f"g{a}" and m["type"] == "token")
            for pid in children(server.proc.pid):
                os.kill(pid, signal.SIGKILL)
            end = await c.finish(f"g{attempt}", timeout=60)
            if attempt < 3:
                assert end["type"] == "complete" and end["usage"]["completion_tokens"] == 400, end
                c.check_sequence(f"g{attempt}")
            else:
                assert end["type"] == "error" and end["code"] == "generation_failed", end
        assert server.proc.wait(timeout=scaled(60)) == 1


async def test_a_killed_worker_is_restarted_and_every_stream_in_flight_goes_on_where_it_was(tiny_gguf: Path) -> None:
    """kill -9 of the OpenVINO worker under 4 WebSocket generations and 2 SSE streams: the worker is restarted and
    all six complete, each seq once and in order, each greedy text equal to the same requests' undisturbed run."""
    prompts = [f"Story number {i}:" for i in range(6)]
    n = 600
    with serve("--engine", "openvino", "--model", str(tiny_gguf), "--quantize", "none", "--device", "cpu") as server:

        async def run(kill: bool) -> list[str]:
            c = await Client.connect(server.ws)
            for i, prompt in enumerate(prompts[:4]):
                await c.send({"type": "generate", "id": f"w{i}", "prompt": prompt, "max_tokens": n,
                              "ignore_eos": True, "temperature": 0})  # fmt: skip
            sse = [asyncio.create_task(_completion_sse(server.http, p, n)) for p in prompts[4:]]
            if kill:
                for i in range(4):
                    await c.until(lambda m, i=i: m.get("id") == f"w{i}" and m["type"] == "token")
                for _ in range(20):  # a few more tokens each
                    await c.recv()
                workers = children(server.proc.pid)
                assert workers
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
            texts = []
            for i in range(4):
                end = await c.finish(f"w{i}", timeout=120)
                assert end["type"] == "complete" and end["usage"]["completion_tokens"] == n, end
                c.check_sequence(f"w{i}")
                texts.append(c.text(f"w{i}"))
            await c.close()
            return texts + [await asyncio.wait_for(t, scaled(120)) for t in sse]

        undisturbed = await run(kill=False)
        disturbed = await run(kill=True)
        assert server.get_json("/v1/stats")["ready"]
        for i, (a, b) in enumerate(zip(undisturbed, disturbed, strict=True)):
            assert a == b, (i, a[:80], b[:80])


async def _completion_sse(base: str, prompt: str, n: int) -> str:
    """The text of a streamed greedy /v1/completions, checked to end with its finish reason and [DONE]."""
    body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0, "stream": True}
    parts: list[str] = []
    data: list[str] = []
    async with httpx.AsyncClient(timeout=scaled(120)) as http, http.stream("POST", base + "/v1/completions",
                                                                          json=body) as r:  # fmt: skip
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    parts = [ch["text"] for c in chunks for ch in c["choices"]]
    return "".join(parts)
