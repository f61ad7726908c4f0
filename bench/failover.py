"""Failover, measured: how long from a replica's death to the first token of its stream resumed on another.

Starts a Redis server (Debian's ``redis-server``) and two tokenwire replicas sharing it (``--journal``), all on
127.0.0.1. Each round: a client starts a generation on replica A and reads a few messages; then either its
connection drops and A is killed (SIGKILL) at once (``kill``), or A is stopped with SIGTERM while the client stays
connected (``roll``: the drain hands the stream over, the socket closes); the client reconnects to replica B and
sends ``resume``. Reported per round: seconds from the kill (or the socket's close) to the first resumed token,
whether every seq arrived once and in order, and how far past the junction the text stays the same as an
uninterrupted greedy run's (the new replica recomputes the prompt and the answer so far in one prefill, whose
float sums differ slightly from the decode steps that first computed them, so two greedy runs may part ways
later, as two batch shapes can), and whether it is the same to the end. A is started again for each round.

    python bench/failover.py --rounds 5 --lease 3 --out bench/results/failover-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import websockets

from compare import BENCH, free_port, start, stop, wait_ready, write_results

PROMPT = "Write a long story about a dragon who learns to paint."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="time from a replica's death to the first resumed token")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind")
    p.add_argument("--kinds", default="kill,roll", help="kill (SIGKILL), roll (SIGTERM, drain hands over)")
    p.add_argument("--lease", type=float, default=3.0, help="--journal-lease of the replicas")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--model", default=None, help="--model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--server-args", default="", help="more flags for both replicas, one string")
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/failover-DATE.json)")
    return p.parse_args(argv)


class Replica:
    def __init__(self, name: str, args: argparse.Namespace, redis_url: str, out: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log = out.with_suffix(f".{name}.log")
        argv = [sys.executable, "-m", "tokenwire.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--journal", redis_url, "--journal-lease", str(args.lease), "--heartbeat-interval", "0"]
        argv += ["--drain-timeout", "1"]
        if args.model:
            argv += ["--model", args.model]
        self.argv = argv + args.server_args.split()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = start(self.argv, self.log, env)
        wait_ready(self.proc, self.port, True, self.log)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def generate(gen_id: str, max_tokens: int) -> str:
    msg = {"type": "generate", "id": gen_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return json.dumps({**msg, "ignore_eos": True})


async def whole_text(url: str, gen_id: str, max_tokens: int) -> str:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(generate(gen_id, max_tokens))
        text = ""
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if m.get("id") != gen_id:
                continue
            text += m.get("content", "") if m["type"] == "token" else ""
            if m.get("finished"):
                return text


async def one_round(kind: str, a: Replica, b: Replica, gen_id: str, max_tokens: int, whole: str) -> dict[str, Any]:
    assert a.proc is not None
    got: list[dict[str, Any]] = []
    ws = await websockets.connect(a.ws, max_size=None)
    await ws.send(generate(gen_id, max_tokens))
    while len([m for m in got if m["type"] == "token"]) < 8:
        m = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if m.get("id") == gen_id:
            got.append(m)
    if kind == "kill":
        ws.transport.abort()  # the connection drops, then its replica dies
        await asyncio.sleep(0.2)
        a.proc.send_signal(signal.SIGKILL)
        died = time.monotonic()
    else:
        a.proc.send_signal(signal.SIGTERM)
        try:
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if m.get("id") == gen_id:
                    got.append(m)
        except (websockets.ConnectionClosed, TimeoutError):
            pass
        died = time.monotonic()
    a.proc.wait(timeout=60)
    seen = got[-1]["seq"]
    before = len(got) - 1  # the index of the last message the client had from A
    first_token_s = None
    async with websockets.connect(b.ws, max_size=None) as ws2:
        await ws2.send(json.dumps({"type": "resume", "id": gen_id, "after_seq": seen}))
        while True:
            m = json.loads(await asyncio.wait_for(ws2.recv(), 120))
            if m.get("id") != gen_id:
                continue
            if m["type"] == "token" and first_token_s is None:
                first_token_s = time.monotonic() - died
            got.append(m)
            if m.get("finished"):
                break
    seqs = [m["seq"] for m in got if "seq" in m]
    text = "".join(m.get("content", "") for m in got if m["type"] == "token")
    junction = len("".join(m.get("content", "") for m in got[: before + 1] if m["type"] == "token"))
    same = next((i for i, (x, y) in enumerate(zip(text, whole, strict=False)) if x != y), min(len(text), len(whole)))
    return {
        "kind": kind,
        "first_token_s": round(first_token_s, 3) if first_token_s is not None else None,
        "seqs_once_in_order": seqs == list(range(len(seqs))),
        "junction_chars": junction,
        "same_chars_past_junction": same - junction,
        "chars_after_junction": len(text) - junction,
        "text_whole": text == whole,
        "completion_tokens": got[-1].get("usage", {}).get("completion_tokens"),
    }


async def run(args: argparse.Namespace, redis_url: str, out: Path) -> list[dict[str, Any]]:
    a, b = Replica("a", args, redis_url, out), Replica("b", args, redis_url, out)
    b.start()
    results = []
    try:
        whole = await whole_text(b.ws, "reference", args.max_tokens)
        for kind in args.kinds.split(","):
            for i in range(args.rounds):
                a.start()
                r = await one_round(kind, a, b, f"{kind}-{i}-{time.time_ns()}", args.max_tokens, whole)
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        for r in (a, b):
            if r.proc is not None:
                stop(r.proc)
    return results


def table(results: list[dict[str, Any]], lease: float) -> str:
    lines = [
        "| kind | rounds | first resumed token after, median s | max s | seqs once, in order "
        "| same text past the junction, median chars (of) | text whole | lease s |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in results):
        rs = [r for r in results if r["kind"] == kind]
        times = [r["first_token_s"] for r in rs if r["first_token_s"] is not None]
        ok = sum(r["seqs_once_in_order"] for r in rs)
        whole = sum(r["text_whole"] for r in rs)
        med = statistics.median(times) if times else float("nan")
        same = statistics.median(r["same_chars_past_junction"] for r in rs)
        after = statistics.median(r["chars_after_junction"] for r in rs)
        lines.append(
            f"| {kind} | {len(rs)} | {med:.2f} | {max(times, default=float('nan')):.2f} | {ok}/{len(rs)} | "
            f"{same:.0f} ({after:.0f}) | {whole}/{len(rs)} | {lease:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    redis = shutil.which("redis-server")
    if redis is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else BENCH / "results" / f"failover-{datetime.now():%Y%m%d-%H%M%S}.json"
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cmd = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            time.sleep(0.5)
            results = asyncio.run(run(args, f"redis://127.0.0.1:{port}/0", out))
        finally:
            server.terminate()
            server.wait(timeout=10)
    write_results(out, args, {}, results, table(results, args.lease))
    return 0


if __name__ == "__main__":
    sys.exit(main())
