"""Metrics, stats, logs and the dashboard, observed from outside a running server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer, free_port
from tokenwire.server.telemetry import public_ref


def scrape(server: RunningServer) -> dict[str, float]:
    return server.metrics()


async def test_every_metric_moves_when_it_should(tiny_server: RunningServer) -> None:
    before = scrape(tiny_server)
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "m1", "prompt": "Hi", "max_tokens": 12, "ignore_eos": True})
        await c.finish("m1")
        await c.send({"type": "generate", "id": "long", "prompt": "Hi", "max_tokens": 3000, "ignore_eos": True})
        await c.until(lambda m: m.get("id") == "long" and m["type"] == "token")
        during = scrape(tiny_server)
        await c.send({"type": "teleport"})  # an error
        await c.until(lambda m: m["type"] == "error")
        await c.send({"type": "cancel", "id": "long"})
        await c.finish("long")
        r = httpx.post(
            tiny_server.http + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}, timeout=30
        )
        assert r.status_code == 200
    finally:
        await c.close()
    after = scrape(tiny_server)

    def grew(name: str, by: float = 1) -> None:
        assert after.get(name, 0) - before.get(name, 0) >= by, (name, before.get(name), after.get(name))

    for hist in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time"):
        grew(f"tokenwire_{hist}_seconds_count", 2)
    grew("tokenwire_prompt_tokens_total", 3)
    grew("tokenwire_generation_tokens_total", 17)
    grew("tokenwire_requests_total{api=websocket,finish_reason=length}")
    grew("tokenwire_requests_total{api=websocket,finish_reason=cancelled}")
    grew("tokenwire_requests_total{api=openai,finish_reason=length}")
    grew("tokenwire_errors_total{code=unknown_type}")
    received = sum(len(v) for v in c.by_id.values()) + len(c.other)  # every message this client read, hello too
    grew("tokenwire_websocket_messages_sent_total", received)
    grew("tokenwire_websocket_bytes_sent_total", 500)
    assert during["tokenwire_num_requests_running"] >= 1
    assert during["tokenwire_websocket_connections"] >= 1
    assert during["tokenwire_kv_cache_used_tokens"] > 0 and 0 < during["tokenwire_kv_cache_usage_ratio"] <= 1
    # what an inference gateway reads by default (Gateway API Inference Extension): the same, under vLLM's names
    assert during["vllm:num_requests_running"] >= 1 and during["vllm:num_requests_waiting"] >= 0
    assert 0 < during["vllm:kv_cache_usage_perc"] == during["vllm:gpu_cache_usage_perc"] <= 1
    assert "tokenwire_num_requests_waiting" in during


async def test_stats_report_connections_and_sessions(tiny_server: RunningServer) -> None:
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "s", "prompt": "Hi", "max_tokens": 8, "ignore_eos": True})
        await c.finish("s")
        stats = tiny_server.get_json("/v1/stats")
        text = tiny_server.get_text("/v1/stats")
        assert c.hello["session"] not in text  # /v1/stats needs no key: nothing in it may resume a generation
        mine = [x for x in stats["connections"] if x["connection"] == public_ref(c.hello["session"])]
        assert len(mine) == 1 and mine[0]["messages_sent"] >= 3 and mine[0]["tokens_generated"] == 8
        assert mine[0]["connected_at"] <= time.time()
        perf = stats["performance"]
        assert perf["total_sessions"] >= 1 and perf["total_tokens_generated"] >= 8
        assert {"average_duration", "average_tokens_per_second", "average_tokens_per_session"} <= set(perf)
        last = stats["completed_sessions"][-1]
        assert last["tokens_sent"] == 8 and last["finish_reason"] == "length" and last["api"] == "websocket"
        assert last["connection"] == public_ref(c.hello["session"])
    finally:
        await c.close()


def test_json_logs_have_one_line_per_request_without_the_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    secret_prompt = "my secret prompt text"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenwire.cli",
                "serve",
                "--model",
                str(tiny_model_dir),
                "--port",
                str(port),
                "--log-format",
                "json",
            ],
            stderr=log,
            stdout=log,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(int(scaled(300))):
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        r = httpx.post(
            base + "/v1/completions", json={"prompt": secret_prompt, "max_tokens": 4, "ignore_eos": True}, timeout=30
        )
        assert r.status_code == 200
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=scaled(20))
    lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    done = [x for x in records if x["logger"] == "tokenwire.requests"]
    assert len(done) == 1
    rec = done[0]
    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] == 4 and rec["finish_reason"] == "length"
    assert {"request_id", "connection", "ttft_ms", "total_ms", "api", "ts", "level"} <= set(rec)
    assert any("ready in" in x["message"] and f"http://127.0.0.1:{port}/" in x["message"] for x in records)
    assert secret_prompt not in log_path.read_text()
