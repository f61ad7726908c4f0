"""Fair admission and the queue timeout over a real server, on both engines (the queue is the engine core's)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.conftest import ENGINES
from tests.e2e.server import serve


def model_args(engine: str, folder: Path, gguf: Path) -> list[str]:
    return ["--engine", engine, "--model", str(folder if engine == "transformers" else gguf), "--device", "cpu"]


@pytest.mark.parametrize("engine", ["transformers", "openvino", *(["llamacpp"] if "llamacpp" in ENGINES else [])])
async def test_one_connections_queue_does_not_starve_another_connection(
    engine: str, tiny_long_model_dir: Path, tiny_gguf: Path
) -> None:
    """With two rows, connection A queues twelve requests, then connection B one: B's request starts at the next
    free row, so it ends before most of A's (FIFO would put it behind all twelve)."""
    args = model_args(engine, tiny_long_model_dir, tiny_gguf)
    with serve(*args, "--max-batch-size", "2", "--max-generations-per-connection", "16") as server:
        a = await Client.connect(server.ws)
        b = await Client.connect(server.ws)
        request = {"type": "generate", "prompt": "Tell me a story", "max_tokens": 60, "ignore_eos": True}
        for i in range(12):
            await a.send({**request, "id": f"a{i}"})
        await a.until(lambda m: m.get("id") == "a11" and m["type"] == "started")
        await b.send({**request, "id": "b"})
        order: list[str] = []

        async def watch_a() -> None:
            for i in range(12):
                await a.finish(f"a{i}", timeout=120)
                order.append(f"a{i}")

        async def watch_b() -> None:
            await b.finish("b", timeout=120)
            order.append("b")

        await asyncio.gather(watch_a(), watch_b())
        assert order.index("b") <= 4, order  # the two running, at most two more of A's, then B's
        await a.close()
        await b.close()


async def test_a_request_that_waits_past_the_queue_timeout_gets_overloaded_with_a_retry_hint(
    tiny_long_model_dir: Path, tiny_gguf: Path
) -> None:
    """One row, held by a long generation: a WebSocket request gets error overloaded with retry_after_s, an HTTP
    request 503 with Retry-After, each after the queue timeout; the long generation goes on."""
    args = model_args("transformers", tiny_long_model_dir, tiny_gguf)
    with serve(*args, "--max-batch-size", "1", "--queue-timeout", "0.5") as server:
        hog = await Client.connect(server.ws)
        await hog.send({"type": "generate", "id": "hog", "prompt": "Go", "max_tokens": 4000, "ignore_eos": True})
        await hog.until(lambda m: m.get("id") == "hog" and m["type"] == "token")

        late = await Client.connect(server.ws)
        await late.send({"type": "generate", "id": "late", "prompt": "Hi", "max_tokens": 5})
        err = await late.finish("late", timeout=30)
        assert err["type"] == "error" and err["code"] == "overloaded", err
        assert "queue timeout" in err["content"] and err["retry_after_s"] >= 1

        model = server.get_json("/v1/models")["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 5}).encode()
        req = urllib.request.Request(server.http + "/v1/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            await asyncio.to_thread(urllib.request.urlopen, req, timeout=scaled(30))
        assert http_err.value.code == 503
        assert int(http_err.value.headers["Retry-After"]) >= 1
        assert json.loads(http_err.value.read())["error"]["code"] == "overloaded"

        stats = server.get_json("/v1/stats")["engine"]
        assert stats["running"] == 1 and stats["waiting"] == 0
        await hog.send({"type": "cancel", "id": "hog"})
        assert (await hog.finish("hog"))["finish_reason"] == "cancelled"
        await hog.close()
        await late.close()
