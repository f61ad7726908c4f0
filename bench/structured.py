"""What constrained decoding costs: the same JSON-asking prompt with and without a JSON Schema, side by side.

Starts ``tokenwire serve`` (``--engine`` as given; the default model), then, in turns (plain, schema, schema,
plain, ...), sends N concurrent generations over the WebSocket protocol and times each token message. Per-token
time is what a schema adds (the mask each step); answers differ in length, so tokens/s is reported per stream.
Also checks that every constrained answer parses as JSON. Prints a Markdown table and writes JSON.

    python bench/structured.py --engine transformers --streams 1,8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from compare import BENCH, free_port, start, stop, wait_ready

PROMPT = "Describe a person (name, age, city, hobbies) as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


async def one(url: str, schema: bool, max_tokens: int, seed: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "generate", "id": "g", "messages": [{"role": "user", "content": PROMPT}],
                           "max_tokens": max_tokens, "temperature": 0.7, "seed": seed}  # fmt: skip
    if schema:
        msg["json_schema"] = SCHEMA
    gaps: list[float] = []
    text: list[str] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # hello
        sent = time.perf_counter()
        await ws.send(json.dumps(msg))
        last = None
        first = None
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if m["type"] == "token":
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                else:
                    first = now - sent
                last = now
                text.append(m["content"])
            elif m["type"] in ("complete", "error"):
                break
    body = "".join(text)
    valid = None
    if schema:
        try:
            valid = isinstance(json.loads(body), dict)
        except ValueError:
            valid = False
    return {"gaps": gaps, "ttft": first, "tokens": m.get("usage", {}).get("completion_tokens", 0), "valid": valid,
            "finish": m.get("finish_reason", m.get("code"))}  # fmt: skip


async def batch(url: str, schema: bool, streams: int, max_tokens: int, round_: int) -> dict[str, Any]:
    runs = await asyncio.gather(*(one(url, schema, max_tokens, round_ * 100 + i) for i in range(streams)))
    gaps = [g for r in runs for g in r["gaps"]]
    return {
        "schema": schema,
        "streams": streams,
        "itl_p50_ms": statistics.median(gaps) * 1000 if gaps else None,
        "ttft_p50_ms": statistics.median(r["ttft"] for r in runs if r["ttft"] is not None) * 1000,
        "tokens": sum(r["tokens"] for r in runs),
        "valid": sum(1 for r in runs if r["valid"]) if schema else None,
        "finish": sorted({str(r["finish"]) for r in runs}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="auto")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out) if a.out else BENCH / "results" / f"structured-{a.engine}-cpu.json"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port), "--engine", a.engine]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start(argv, log, env)
        try:
            wait_ready(proc, port, True, log)
            url = f"ws://127.0.0.1:{port}/ws"
            asyncio.run(batch(url, True, 1, 16, 99))  # warm-up: llguidance builds its tokenizer view once
            rows = []
            for n in [int(s) for s in a.streams.split(",")]:
                for r in range(a.rounds):
                    for schema in (False, True) if r % 2 == 0 else (True, False):
                        res = asyncio.run(batch(url, schema, n, a.max_tokens, r))
                        print(json.dumps(res), flush=True)
                        rows.append(res)
        finally:
            stop(proc)
    table = [
        "| streams | schema | ITL p50 ms (median of rounds) | TTFT p50 ms | valid JSON |",
        "|---:|---|---:|---:|---|",
    ]
    for n in sorted({r["streams"] for r in rows}):
        for schema in (False, True):
            rs = [r for r in rows if r["streams"] == n and r["schema"] == schema]
            itl = statistics.median(r["itl_p50_ms"] for r in rs)
            ttft = statistics.median(r["ttft_p50_ms"] for r in rs)
            valid = f"{sum(r['valid'] for r in rs)}/{n * len(rs)}" if schema else ""
            table.append(f"| {n} | {'yes' if schema else 'no'} | {itl:.1f} | {ttft:.0f} | {valid} |")
    text = "\n".join(table)
    print(text)
    out.write_text(json.dumps({"engine": a.engine, "runs": rows}, indent=1))
    out.with_suffix(".md").write_text(f"bench/structured.py --engine {a.engine}\n\n{text}\n")


if __name__ == "__main__":
    main()
