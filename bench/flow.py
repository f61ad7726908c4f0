"""Flow control, measured: what dropped connections and slow readers cost the clients that are still there.

Runs two builds side by side (A: a revision before flow control, B: this tree; bench/ab.py's export), each as a
``tokenwire serve`` process on the default model, and for each:

1. **idle**: one live stream alone; its decode speed (tokens after the first / time after the first).
2. **drops**: 16 streams start long generations, then their connections vanish (no close handshake); 2 s later
   one live stream runs: its decode speed over idle is the figure (issue target: >= 0.85). Then each dropped
   generation is resumed from a new connection and read to its end: every seq once and in order, every token
   (checked, reported as ``resumed_whole``).
3. **slow readers**: 8 live readers alone, then the same with 8 readers that never read (4 KiB receive buffer)
   running long generations: the live readers' inter-token latency with them over without (target <= 1.1),
   measured once the stuck readers' generations are paused (at most 90 s; the time it took is reported; a build
   without flow control never pauses them, so its figure includes them decoding all along).

    python bench/flow.py --a aa9c5bf --b WORKTREE --out bench/results/flow-cpu.json

Only 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from ab import export
from compare import BENCH, free_port, start, stop, wait_ready

PROMPT = "Write a long story about a dragon who learns to paint."


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=10) as r:
        return dict(json.loads(r.read()))


async def until_idle(port: int, timeout: float = 180.0) -> None:
    """Until nothing runs or waits (paused generations cost nothing and may stay)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = stats(port)["engine"]
        if e["running"] == 0 and e["waiting"] == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the engine did not become idle")


async def hello(ws: ClientConnection) -> dict[str, Any]:
    msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert msg["type"] == "hello", msg
    return dict(msg)


def generate(gen_id: str, max_tokens: int) -> str:
    return json.dumps(
        {
            "type": "generate",
            "id": gen_id,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.7,
        }
    )


async def live_stream(url: str, max_tokens: int) -> dict[str, float]:
    """One stream read as it comes: decode tokens/s and inter-token gaps (ms)."""
    async with connect(url, max_size=None) as ws:
        await hello(ws)
        await ws.send(generate("live", max_tokens))
        times: list[float] = []
        tokens = 0
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if msg.get("type") in ("token", "tokens"):
                times.append(time.monotonic())
                tokens += msg.get("tokens", 1)
            elif msg.get("type") in ("complete", "error"):
                break
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"tokens_per_s": (tokens - 1) / span, "itl_ms_mean": statistics.fmean(gaps), "tokens": tokens}


async def drops(url: str, port: int, n: int, max_tokens: int, live_tokens: int, idle_tps: float) -> dict[str, Any]:
    conns = []
    seen: dict[str, tuple[str, int]] = {}
    for i in range(n):
        ws = await connect(url, max_size=None)
        session = (await hello(ws))["session"]
        await ws.send(generate(f"d{i}", max_tokens))
        conns.append((ws, session))
    for i, (ws, session) in enumerate(conns):
        last = -1
        while last < 1:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if msg.get("id") == f"d{i}":
                last = msg["seq"]
        seen[f"d{i}"] = (session, last)
    for ws, _ in conns:
        ws.transport.abort()
    await asyncio.sleep(2.0)
    engine = stats(port)["engine"]
    live = await live_stream(url, live_tokens)
    outcomes = await asyncio.gather(*(resume_whole(url, g, s, last, max_tokens) for g, (s, last) in seen.items()))
    return {
        "engine_2s_after_drop": {k: engine.get(k, 0) for k in ("running", "waiting", "paused")},
        "live_tokens_per_s": live["tokens_per_s"],
        "live_over_idle": live["tokens_per_s"] / idle_tps,
        "resumed_whole": f"{sum(outcomes)}/{n}",
    }


async def resume_whole(url: str, gen_id: str, session: str, last: int, max_tokens: int) -> bool:
    """Resume ``gen_id`` after ``last`` and read it to the end: every seq once and in order, all its tokens."""
    async with connect(url, max_size=None) as ws:
        await hello(ws)
        await ws.send(json.dumps({"type": "resume", "id": gen_id, "session": session, "after_seq": last}))
        seqs, end = [], None
        while end is None:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if msg.get("id") != gen_id or msg["type"] == "resumed":
                continue
            if "seq" not in msg:  # the resume was refused
                print(f"resume of {gen_id} refused: {msg}", flush=True)
                return False
            seqs.append(msg["seq"])
            if msg["type"] in ("complete", "error"):
                end = msg
    return bool(
        end["type"] == "complete"
        and seqs == list(range(last + 1, end["seq"] + 1))
        and end["usage"]["completion_tokens"] == max_tokens
    )


async def stuck_reader(url: str, port: int, gen_id: str, max_tokens: int) -> ClientConnection:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    ws = await connect(url, sock=sock, max_size=None, max_queue=1)
    await ws.send(generate(gen_id, max_tokens))
    return ws


async def readers(url: str, n: int, max_tokens: int) -> dict[str, float]:
    results = await asyncio.gather(*(live_stream(url, max_tokens) for _ in range(n)))
    return {
        "itl_ms_mean": statistics.fmean(r["itl_ms_mean"] for r in results),
        "tokens_per_s_each": statistics.fmean(r["tokens_per_s"] for r in results),
    }


async def slow(url: str, port: int, n: int, live_tokens: int) -> dict[str, Any]:
    alone = await readers(url, n, live_tokens)
    await until_idle(port)
    t0 = time.monotonic()
    stuck = [await stuck_reader(url, port, f"s{i}", 4000) for i in range(n)]
    while stats(port)["engine"].get("paused", 0) < n and time.monotonic() - t0 < 90:
        await asyncio.sleep(0.1)
    all_paused_s = time.monotonic() - t0
    mixed = await readers(url, n, live_tokens)
    engine = stats(port)["engine"]
    for ws in stuck:
        ws.transport.abort()
    return {
        "alone": alone,
        "with_stuck_readers": mixed,
        "engine_at_end": {k: engine.get(k, 0) for k in ("running", "waiting", "paused")},
        "seconds_until_stuck_paused": round(all_paused_s, 1),
        "itl_with_over_without": mixed["itl_ms_mean"] / alone["itl_ms_mean"],
    }


async def scenario(url: str, port: int, a: argparse.Namespace) -> dict[str, Any]:
    await live_stream(url, 16)  # warm-up
    idle = await live_stream(url, a.live_tokens)
    await until_idle(port)
    dropped = await drops(url, port, a.drops, a.drop_tokens, a.live_tokens, idle["tokens_per_s"])
    await until_idle(port)
    slowed = await slow(url, port, a.readers, a.live_tokens)
    return {"idle_tokens_per_s": idle["tokens_per_s"], "drops": dropped, "slow_readers": slowed}


def markdown(results: dict[str, dict[str, Any]], names: dict[str, str], a: argparse.Namespace) -> str:
    lines = [
        "# Flow control: dropped connections and slow readers (bench/flow.py)",
        "",
        f"Default model, one `tokenwire serve` per build, run one after the other on this machine ({os.cpu_count()} "
        "cores). Ratios within one build's run; compare builds by ratio, not absolute speed.",
        "",
        *[f"- {b}: {n}" for b, n in names.items()],
        "",
        f"| build | idle tok/s (1 stream) | live tok/s 2 s after {a.drops} drops | ratio (target >= 0.85) | engine 2 s "
        f"after the drops | resumed whole | live ITL with {a.readers} stuck readers / without (target <= 1.1) | "
        "stuck readers paused after |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for build, r in results.items():
        d, s = r["drops"], r["slow_readers"]
        e = d["engine_2s_after_drop"]
        lines.append(
            f"| {build} | {r['idle_tokens_per_s']:.1f} | {d['live_tokens_per_s']:.1f} | {d['live_over_idle']:.2f} | "
            f"running {e['running']}, paused {e['paused']} | {d['resumed_whole']} | "
            f"{s['itl_with_over_without']:.2f} ({s['with_stuck_readers']['itl_ms_mean']:.1f} / "
            f"{s['alone']['itl_ms_mean']:.1f} ms) | {s['seconds_until_stuck_paused']} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", default="aa9c5bf", help="revision before flow control")
    p.add_argument("--b", default="WORKTREE")
    p.add_argument("--model", default=None)
    p.add_argument("--drops", type=int, default=16)
    p.add_argument("--drop-tokens", type=int, default=600)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--live-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"flow-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tokenwire-flow-") as tmp:
        for build, rev in (("A", a.a), ("B", a.b)):
            tree = Path(tmp) / build
            tree.mkdir()
            names[build] = f"{rev} = {export(rev, tree)[:12]}"
            port = free_port()
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(tree / "src"))
            argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port)]
            argv_tw += ["--model", a.model] if a.model else []
            log_path = out.with_suffix(f".{build}.log")
            print(f"{build}: {names[build]}", flush=True)
            proc: subprocess.Popen[bytes] = start(argv_tw, log_path, env)
            try:
                wait_ready(proc, port, True, log_path)
                results[build] = asyncio.run(scenario(f"ws://127.0.0.1:{port}/", port, a))
                print(json.dumps(results[build], indent=1), flush=True)
            finally:
                stop(proc)
    out.write_text(json.dumps({"date": stamp, "builds": names, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, names, a))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
