"""deploy/nginx.conf in front of two real tokenwire processes: WebSocket and SSE pass through, unbuffered,
spread over the backends, a client reconnecting with its affinity token resumes on the same backend, and a
dead backend is skipped. nginx from Debian, on 127.0.0.1 only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import free_port, serve

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found:
        return found
    if os.environ.get("TOKENWIRE_REQUIRE_BROWSER"):  # CI installs the test tools: a missing one is a failure
        pytest.fail("nginx is not installed: install Debian's nginx-light package")
    pytest.skip("nginx is not installed")


def render(backends: list[int], port: int, workdir: Path) -> str:
    """The shipped config with only the addresses, the listen port and the temp paths changed."""
    text = CONFIG.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in backends)
    text = re.sub(r"(        server tokenwire-\d:8765[^\n]*\n)+", servers, text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    return text.replace("/tmp/nginx-tokenwire", str(workdir / "nginx"))


@contextmanager
def nginx_in_front(backends: list[int], work: Path) -> Iterator[str]:
    """The shipped config in front of ``backends`` (ports); yields its base URL once it answers /ready."""
    nginx = nginx_binary()
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(render(backends, port, work))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work), "-g", "daemon off;"])
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(int(scaled(100))):
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=scaled(10))


@pytest.fixture(scope="module")
def cluster(tiny_long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list]]:
    work = tmp_path_factory.mktemp("nginx")
    args = ("--model", str(tiny_long_model_dir), "--heartbeat-interval", "0")
    with serve(*args) as a, serve(*args) as b, nginx_in_front([a.port, b.port], work) as base:
        yield base, [a, b]


async def test_websocket_through_nginx_is_balanced_over_the_backends(cluster: tuple[str, list]) -> None:
    base, backends = cluster
    ws_url = base.replace("http", "ws", 1)
    clients = [await Client.connect(ws_url) for _ in range(2)]  # the tutorial's URL: ws://host:port/
    try:
        for i, c in enumerate(clients):
            await c.send({"type": "generate", "id": "g", "prompt": f"Hi {i}", "max_length": 20, "ignore_eos": True})
        for c in clients:
            done = await c.finish("g")
            assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 20
            c.check_sequence("g")
        counts = [s.get_json("/v1/stats")["active_connections"] for s in backends]
        assert counts == [1, 1]  # least_conn put one long-lived socket on each process
    finally:
        for c in clients:
            await c.close()


async def test_a_reconnect_with_the_same_affinity_token_resumes_through_nginx(cluster: tuple[str, list]) -> None:
    """Three drops in a row: each reconnect with ?affinity= reaches the process that runs the generation, so the
    resume succeeds every time (without affinity, least_conn would pick either process)."""
    base, _ = cluster
    url = base.replace("http", "ws", 1) + "/ws?affinity=tab-7f3a"
    c = await Client.connect(url)
    origin = c.hello["session"]
    await c.send({"type": "generate", "id": "g", "prompt": "Hi", "max_tokens": 600, "ignore_eos": True})
    seen = -1
    for _ in range(3):
        await c.until(lambda m, seen=seen: m.get("id") == "g" and m.get("seq", -1) > seen + 2)
        seen = max(m["seq"] for m in c.by_id["g"] if "seq" in m)
        await c.vanish()
        c = await Client.connect(url)
        await c.send({"type": "resume", "id": "g", "after_seq": seen, "session": origin})
        resumed = await c.until(lambda m: m.get("id") == "g")
        assert resumed["type"] == "resumed", resumed
    done = await c.until(lambda m: m.get("id") == "g" and m["type"] == "complete")
    assert done["usage"]["completion_tokens"] == 600
    await c.close()


def test_sse_through_nginx_is_not_buffered(cluster: tuple[str, list]) -> None:
    base, _ = cluster
    # long enough to last well over 0.2 s even where the tiny model makes 4,000 tokens a second (an AMD EPYC)
    body = {"prompt": "Hi", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    times: list[float] = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=scaled(60)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())
    assert len(times) > 50
    # unbuffered: the first events arrived well before the last, not all together at the end
    assert times[-1] - times[0] > 0.2 and times[10] - times[0] < (times[-1] - times[0]) / 2


async def test_a_dead_backend_is_skipped(cluster: tuple[str, list]) -> None:
    base, backends = cluster
    backends[0].proc.terminate()
    backends[0].proc.wait(timeout=scaled(20))
    ws_url = base.replace("http", "ws", 1)
    for i in range(4):
        c = await Client.connect(ws_url + "/ws")
        await c.send({"type": "generate", "id": "x", "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert (await c.finish("x"))["type"] == "complete", i
        await c.close()
    r = httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
