"""Graceful drain on SIGTERM, over a real server process: running answers finish, new work is refused meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer, serve


def status_of(server: RunningServer, path: str) -> tuple[int, dict[str, Any], Any]:
    try:
        with urllib.request.urlopen(server.http + path, timeout=scaled(5)) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def post_completion(server: RunningServer, model: str) -> tuple[int, dict[str, Any], Any]:
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 3}).encode()
    req = urllib.request.Request(server.http + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=scaled(10)) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


async def closed_with(client: Client) -> int | None:
    with pytest.raises(websockets.ConnectionClosed) as info:
        for _ in range(100_000):
            await client.recv(timeout=30)
    return info.value.rcvd.code if info.value.rcvd is not None else None


async def test_sigterm_lets_the_running_answer_finish_and_refuses_new_work(tiny_long_model_dir: Path) -> None:
    """SIGTERM with a generation streaming: /ready turns 503 at once, the client hears a notice, its new generate
    gets shutting_down, a new WebSocket is refused (shutting_down, 1001), an HTTP request gets 503 with
    Retry-After; the running generation ends with complete, all its tokens; then the socket closes with 1001 and
    the process exits."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--drain-timeout", "60") as server:
        model = server.get_json("/v1/models")["data"][0]["id"]
        c = await Client.connect(server.ws)
        await c.send({"type": "generate", "id": "g", "prompt": "Hi", "max_tokens": 1500, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "g" and m["type"] == "token")
        server.proc.send_signal(signal.SIGTERM)

        notice = await c.until(lambda m: m["type"] == "notice", timeout=10)
        assert notice["code"] == "draining" and notice["drain_s"] == 60 and notice["finished"] is False
        status, body, headers = status_of(server, "/ready")
        assert status == 503 and body["status"] == "draining" and headers["Retry-After"] == "1"
        assert server.get_json("/v1/stats")["draining"] is True

        await c.send({"type": "generate", "id": "new", "prompt": "Hi", "max_tokens": 3})
        refused = await c.until(lambda m: m.get("id") == "new")
        assert refused["type"] == "error" and refused["code"] == "shutting_down"

        late = await websockets.connect(server.ws + "/ws")
        first = json.loads(await late.recv())
        assert first["type"] == "error" and first["code"] == "shutting_down"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await late.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001

        status, body, headers = post_completion(server, model)
        assert status == 503 and body["error"]["code"] == "shutting_down" and int(headers["Retry-After"]) >= 1

        end = await c.finish("g", timeout=60)
        assert end["type"] == "complete" and end["usage"]["completion_tokens"] == 1500
        c.check_sequence("g")
        assert await closed_with(c) == 1001
        assert server.proc.wait(timeout=scaled(20)) in (0, -signal.SIGTERM)


async def test_a_second_sigterm_ends_the_drain_at_once(tiny_long_model_dir: Path) -> None:
    """A long generation and a long drain timeout: the second SIGTERM ends it with shutting_down (every message
    before it delivered, seq on) and the process exits, without waiting for the timeout."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--drain-timeout", "120") as server:
        c = await Client.connect(server.ws)
        await c.send({"type": "generate", "id": "g", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "g" and m["type"] == "token")
        server.proc.send_signal(signal.SIGTERM)
        await c.until(lambda m: m["type"] == "notice", timeout=10)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        err = await c.finish("g", timeout=30)
        assert err["type"] == "error" and err["code"] == "shutting_down"
        assert [m["seq"] for m in c.by_id["g"]] == list(range(len(c.by_id["g"])))
        assert await closed_with(c) == 1001
        server.proc.wait(timeout=scaled(20))
        assert time.monotonic() - t0 < scaled(15)


async def test_the_drain_timeout_ends_what_is_still_running_with_shutting_down(tiny_long_model_dir: Path) -> None:
    """A generation that cannot finish within --drain-timeout ends with shutting_down when it is over, then the
    socket closes with 1001."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--drain-timeout", "1") as server:
        c = await Client.connect(server.ws)
        await c.send({"type": "generate", "id": "g", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "g" and m["type"] == "token")
        # a Responses stream over SSE and one over the Responses WebSocket mode, running too
        body = {"input": "Hi", "max_output_tokens": 4000, "ignore_eos": True}
        sse = asyncio.create_task(_responses_sse(server, {**body, "stream": True}))
        rws = await websockets.connect(server.http.replace("http://", "ws://") + "/v1/responses")
        await rws.send(json.dumps({"type": "response.create", **body}))
        while json.loads(await rws.recv())["type"] != "response.output_text.delta":
            pass
        t0 = time.monotonic()
        server.proc.terminate()
        err = await c.finish("g", timeout=30)
        assert err["type"] == "error" and err["code"] == "shutting_down"
        assert time.monotonic() - t0 >= 0.9  # it had its second
        assert [m["seq"] for m in c.by_id["g"]] == list(range(len(c.by_id["g"])))
        assert await closed_with(c) == 1001
        events = await asyncio.wait_for(sse, scaled(30))
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"]["code"] == "shutting_down"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        last: dict[str, Any] = {}
        with pytest.raises(websockets.ConnectionClosed) as info:
            for _ in range(100_000):
                ev = json.loads(await asyncio.wait_for(rws.recv(), scaled(30)))
                last = ev if ev["type"].startswith("response.") and "response" in ev else last
                if ev["type"] == "error":
                    assert ev["code"] == "shutting_down"
        assert last["type"] == "response.failed" and info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert server.proc.wait(timeout=scaled(20)) in (0, -signal.SIGTERM)


async def _responses_sse(server: RunningServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=scaled(60)) as http,
        http.stream("POST", server.http + "/v1/responses", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped yet) is not running
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "systemd-stop"])
async def test_a_signal_to_the_whole_process_group_drains_and_running_answers_finish(
    tiny_gguf: Path, sig: signal.Signals
) -> None:
    """A terminal's Ctrl-C (SIGINT) and systemd's stop (SIGTERM) reach every process of the group, the OpenVINO
    worker included: it ignores them, so a WebSocket generation and an SSE stream in flight both finish whole
    (complete with every token; the last chunk, usage and [DONE]) while /ready answers 503; then the server and
    its worker exit."""
    n = 3000
    with serve(
        "--engine", "openvino", "--model", str(tiny_gguf), "--quantize", "none", "--drain-timeout", "60",
        new_session=True,
    ) as server:  # fmt: skip
        workers = children(server.proc.pid)
        assert workers, "the OpenVINO worker process is not there"
        c = await Client.connect(server.ws)
        await c.send({"type": "generate", "id": "g", "prompt": "Hi", "max_tokens": n, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "g" and m["type"] == "token")
        streaming = asyncio.Event()
        body = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": n,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sse = asyncio.create_task(_chat_sse(server, body, streaming))
        await asyncio.wait_for(streaming.wait(), scaled(30))

        os.killpg(server.proc.pid, sig)
        deadline = time.monotonic() + scaled(10)
        while status_of(server, "/ready")[0] != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503"
            await asyncio.sleep(0.05)
        assert not sse.done(), "the SSE stream ended before the drain was seen"

        end = await c.finish("g", timeout=120)
        assert end["type"] == "complete" and end["usage"]["completion_tokens"] == n, end
        c.check_sequence("g")
        chunks = await asyncio.wait_for(sse, scaled(120))
        assert chunks[-1] == "[DONE]"
        finals = [json.loads(x) for x in chunks[:-1]]
        assert finals[-1]["usage"]["completion_tokens"] == n
        assert [ch["finish_reason"] for f in finals for ch in f["choices"] if ch["finish_reason"]] == ["length"]
        assert server.proc.wait(timeout=scaled(30)) in (0, -sig)
        deadline = time.monotonic() + scaled(10)
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the worker process outlived the server"
            await asyncio.sleep(0.05)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


async def _chat_sse(server: RunningServer, body: dict[str, Any], streaming: asyncio.Event) -> list[str]:
    """The data lines of a streamed chat completion, in order; ``streaming`` is set at the first."""
    data: list[str] = []
    async with (
        httpx.AsyncClient(timeout=scaled(120)) as http,
        http.stream("POST", server.http + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                streaming.set()
    return data


async def test_the_worker_ends_when_the_server_process_dies(tiny_gguf: Path) -> None:
    """The worker ignores SIGINT and SIGTERM, so nothing but the server ends it: when the server is killed (no
    drain, no close), the worker sees its pipe close and exits by itself, within seconds."""
    with serve("--engine", "openvino", "--model", str(tiny_gguf), "--quantize", "none", new_session=True) as server:
        workers = children(server.proc.pid)
        assert workers
        server.proc.kill()
        server.proc.wait(timeout=scaled(10))
        deadline = time.monotonic() + scaled(15)
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the worker outlived the server"
            await asyncio.sleep(0.1)
