"""bench/loadgen.py measures what it says, in each mode, against a real server on a scripted engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.server import serving
from tests.fakes import FakeEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import loadgen


@pytest.mark.parametrize("mode", ["tokenwire", "openai"])
async def test_loadgen_counts_every_stream_token_and_latency(mode: str) -> None:
    engine = FakeEngine(reply="one two three four", pieces=4, delay=0.01)
    async with serving(engine) as (base, _):
        url = base.replace("http", "ws", 1) + "/" if mode == "tokenwire" else base
        cfg = loadgen.LoadConfig(url=url, streams=3, max_tokens=8, mode=mode, model="fake-model", timeout=30)
        summary = await loadgen.run_load(cfg)
    assert summary["errors"] == 0 and summary["completed"] == 3 and not summary["timed_out"]
    chunks = -(-len(engine.reply) // (len(engine.reply) // 4))  # the fake engine's pieces, one token each
    assert summary["tokens"] == 3 * chunks == summary["usage_completion_tokens"]
    assert summary["ttft_ms"]["n"] == 3 and summary["itl_ms"]["n"] > 0
    assert summary["tokens_per_s"] > 0 and summary["finish_reasons"] == {"stop": 3}
    assert len(engine.requests) == 4  # the warm-up, then one per stream


def test_loadgen_refuses_anything_but_loopback() -> None:
    with pytest.raises(SystemExit, match=r"only http://127\.0\.0\.1"):
        loadgen.check_url("http://example.com:80", "openai")
    with pytest.raises(SystemExit, match=r"only ws://127\.0\.0\.1"):
        loadgen.check_url("http://127.0.0.1:80", "tokenwire")
