"""32 conversations arriving at once with the same 300-token system prompt: time to first token, p50 and p99.

Every conversation sends the system prompt of bench/chat_turns.py and a question of its own to an OpenAI-compatible
``/v1/chat/completions`` endpoint, streamed, all at the same moment. Without prefix caching the server computes the
system prompt once per conversation (32 x ~320 tokens); with it, the conversations scheduled after the first one
computed it find its blocks and compute only their question. Reports TTFT p50/p99 over every conversation of every
round, the time until the last one's first token, and the cached prompt tokens the server reported.

    python bench/shared_system.py --serve "--engine transformers --prefix-caching on" \\
        --serve "--engine transformers --prefix-caching off" --rounds 2 --out bench/results/shared-system-hf-cpu.json

Servers start first (the default model unless the arguments name one); each round then runs one burst against
each, in an order that alternates. ``--url`` measures a server already running instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from chat_turns import QUESTIONS, SYSTEM, add_target_arguments, read_event, streamed_chat, targets


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def conversation(
    client: httpx.AsyncClient, url: str, model: str, system: str, question: str, max_tokens: int
) -> tuple[float, int]:
    """One streamed first turn: (TTFT ms, the prompt tokens the server reported cached)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body = streamed_chat(model, messages, max_tokens)
    start = time.perf_counter()
    first: float | None = None
    cached = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            piece, reported = read_event(line)
            cached = reported if reported is not None else cached
            if first is None and piece:
                first = time.perf_counter()
    return ((first or time.perf_counter()) - start) * 1000, cached


async def burst(url: str, model: str, n: int, max_tokens: int, tag: str) -> list[tuple[float, int]]:
    """``n`` conversations at once, the same system prompt (new to the server: ``tag``), their own questions."""
    system = f"[{tag}] {SYSTEM}"
    questions = [f"I am customer {i}. {QUESTIONS[i % len(QUESTIONS)]}" for i in range(n)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(conversation(client, url, model, system, q, max_tokens) for q in questions))


def summary(label: str, runs: list[list[tuple[float, int]]]) -> dict[str, Any]:
    ttfts = [t for run in runs for t, _ in run]
    cached = [c for run in runs for _, c in run]
    return {
        "label": label,
        "rounds": len(runs),
        "conversations": len(runs[0]),
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p99": round(percentile(ttfts, 0.99), 1),
        "last_first_token_ms": round(statistics.median(max(t for t, _ in run) for run in runs), 1),
        "cached_tokens_median": statistics.median(cached),
        "conversations_with_cached_tokens": sum(1 for c in cached if c > 0),
        "ttft_ms": [[round(t, 1) for t, _ in run] for run in runs],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| server | conversations | TTFT p50 ms | TTFT p99 ms | last first token ms | cached tokens (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['conversations']} x {r['rounds']} | {r['ttft_ms_p50']:.0f} | "
            f"{r['ttft_ms_p99']:.0f} | {r['last_first_token_ms']:.0f} | {r['cached_tokens_median']:.0f} |"
        )
    if len(results) == 2:
        a, b = results
        lines += [
            "",
            f"{b['label']} / {a['label']}: TTFT p50 {b['ttft_ms_p50'] / a['ttft_ms_p50']:.2f}x, "
            f"p99 {b['ttft_ms_p99'] / a['ttft_ms_p99']:.2f}x",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_target_arguments(p)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args(argv)
    if a.conversations < 1 or a.rounds < 1:
        p.error("--conversations and --rounds must be >= 1")
    with targets(p, a, "tokenwire-shared-system-") as (urls, labels):
        load = os.getloadavg()[0]
        models = [a.model or httpx.get(url + "/v1/models").json()["data"][0]["id"] for url in urls]
        for url, model in zip(urls, models, strict=True):
            asyncio.run(burst(url, model, 1, 4, "warm-up"))
        runs: list[list[list[tuple[float, int]]]] = [[] for _ in urls]
        for i in range(a.rounds):
            order = list(range(len(urls)))
            for s in order if i % 2 == 0 else order[::-1]:
                runs[s].append(asyncio.run(burst(urls[s], models[s], a.conversations, a.max_tokens, f"round {i}")))
                print(f"{labels[s]}: round {i} done", flush=True)
    results = [summary(label, r) for label, r in zip(labels, runs, strict=True)]
    table = markdown(results)
    print(table)
    if a.out:
        out = Path(a.out)
        meta = {"command": shlex.join(sys.argv), "cpu_count": os.cpu_count(), "loadavg_1m": [load, os.getloadavg()[0]]}
        out.write_text(json.dumps({"meta": meta, "results": results, "markdown": table}, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
