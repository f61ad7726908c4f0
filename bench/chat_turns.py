"""A 10-turn chat with a long system prompt: does turn 10 start as fast as turn 1?

Each turn sends the whole conversation so far (system prompt, every question and answer) to an OpenAI-compatible
``/v1/chat/completions`` endpoint, streamed, and times the first content chunk. Without prefix caching a server
recomputes the growing history every turn; with it, turn 10 costs about what turn 1 does. Works against
tokenwire and llama-server alike. Prints one JSON object per server: TTFT per turn (median over ``--rounds``
chats), turn 10 / turn 1, and the prompt tokens the server reported cached per turn (``usage``; 0 if it does not).

    python bench/chat_turns.py --url http://127.0.0.1:8765 [--turns 10] [--rounds 3]

Or let it start tokenwire servers (the default model unless the arguments name one), side by side in one run: each
``--serve`` is one server's arguments; all start first, then every round runs one chat against each, in an order
that alternates, so that drift of the machine hits all of them. ``--out`` writes the results (JSON and a Markdown
table):

    python bench/chat_turns.py --serve "--engine transformers --prefix-caching on" \
        --serve "--engine transformers --prefix-caching off" --rounds 2 --out bench/results/chat-turns-hf-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from compare import free_port, start, stop, wait_ready

# About 300 tokens with SmolLM2's tokenizer.
SYSTEM = (
    "You are Ada, the support assistant of Northwind Rail, a regional train company. Answer in two or three "
    "sentences, plainly and politely. You know the timetable: trains leave the Central station for Harbor, "
    "Hillside and the Airport every twenty minutes from five in the morning until midnight; night buses "
    "replace them after midnight. Tickets: a single ticket costs three euros, a day pass nine, a monthly pass "
    "sixty; children under six travel free, students and seniors pay half. Bicycles travel free outside the "
    "rush hours (seven to nine and four to seven on weekdays). Lost property is kept for thirty days at the "
    "Central station office, open from eight to six. Refunds: a delay of more than thirty minutes gives half "
    "the fare back, more than an hour the whole fare; claims go through the website within fourteen days. "
    "Dogs travel free on a leash; larger animals need a ticket. Never invent facts that are not in this "
    "message; when you do not know, say so and give the phone number of the help desk, 555 0100, which is "
    "open every day from six to ten. Do not discuss other companies, politics or prices of other services. "
    "Keep a friendly tone, use the customer's name when they give it, and end with a short offer of more help. "
    "If the customer is upset, apologise once and then help with the facts; do not repeat the apology later."
)
QUESTIONS = [
    "Hi, I'm Sam. When is the first train to the Airport?",
    "How much is a day pass?",
    "Can I take my bike at eight in the morning?",
    "My train was 45 minutes late. What can I get back?",
    "Where do I ask about a bag I forgot yesterday?",
    "Is my six-year-old daughter free?",
    "Can my dog come along?",
    "What happens after midnight?",
    "How do I claim the refund?",
    "Thanks! What number do I call if I have more questions?",
]


def streamed_chat(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """The body of a greedy, streamed chat completion that reports usage (with the cached prompt tokens)."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def read_event(line: str) -> tuple[str | None, int | None]:
    """One SSE line of a streamed chat completion: (its text delta, the cached prompt tokens it reports)."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None, None
    chunk = json.loads(line[6:])
    details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    choices = chunk.get("choices") or []
    piece = (choices[0].get("delta") or {}).get("content") if choices else None
    return piece, int(cached) if cached else None


def turn(
    client: httpx.Client, url: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str, int]:
    """One streamed request: (TTFT ms, the answer, the prompt tokens the server reported cached)."""
    body = streamed_chat(model, messages, max_tokens)
    start = time.perf_counter()
    first: float | None = None
    text = ""
    cached = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            piece, reported = read_event(line)
            cached = reported if reported is not None else cached
            if piece:
                if first is None:
                    first = time.perf_counter()
                text += piece
    return ((first or time.perf_counter()) - start) * 1000, text, cached


Chat = tuple[list[float], list[int], list[str]]  # per turn: TTFT ms, cached prompt tokens, the answer


def chat(client: httpx.Client, url: str, model: str, turns: int, max_tokens: int, tag: str) -> Chat:
    """One conversation, turn by turn."""
    # A tag in the system prompt makes every chat new to the server's cache (nothing from an earlier round).
    messages = [{"role": "system", "content": f"[{tag}] {SYSTEM}"}]
    ttfts, cached, answers = [], [], []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        ttft, answer, hit = turn(client, url, model, messages, max_tokens)
        ttfts.append(ttft)
        cached.append(hit)
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer})
    return ttfts, cached, answers


@contextlib.contextmanager
def servers(serve_args: list[str], logs: Path) -> Iterator[list[str]]:
    """Start a ``tokenwire serve`` per argument string (the same venv, this checkout); yields their URLs."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs = []
    urls = []
    try:
        for i, args in enumerate(serve_args):
            port = free_port()
            argv = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port), *shlex.split(args)]
            log = logs / f"server-{i}.log"
            procs.append(start(argv, log, env))
            wait_ready(procs[-1], port, True, log)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            stop(proc)


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """The servers to measure (see :func:`targets`), the model field, and where results go."""
    p.add_argument("--url", help="http://127.0.0.1:PORT of a running server")
    p.add_argument("--serve", action="append", default=[], help="start tokenwire serve with these arguments")
    p.add_argument("--model", default="", help="the model field (default: the first of /v1/models)")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="write the results here (JSON) and as a Markdown table (.md)")


@contextlib.contextmanager
def targets(p: argparse.ArgumentParser, a: argparse.Namespace, prefix: str) -> Iterator[tuple[list[str], list[str]]]:
    """``--url``, or a ``tokenwire serve`` per ``--serve`` (started here, its log in a temporary folder, stopped at
    the end); yields their URLs and labels."""
    if bool(a.url) == bool(a.serve):
        p.error("give --url or --serve (one or more)")
    if a.url:
        yield [a.url], [a.label]
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, servers(a.serve, Path(tmp)) as urls:
        yield urls, [f"tokenwire {args}" for args in a.serve]


def summary(label: str, url: str, turns: int, rounds: list[Chat]) -> dict[str, Any]:
    per_turn = [round(statistics.median(r[0][t] for r in rounds), 1) for t in range(turns)]
    return {
        "label": label,
        "url": url,
        "turns": turns,
        "rounds": len(rounds),
        "ttft_ms_per_turn": per_turn,
        "cached_tokens_per_turn": [min(r[1][t] for r in rounds) for t in range(turns)],
        "last_over_first": round(per_turn[-1] / per_turn[0], 2),
        "answers": [r[2] for r in rounds],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| server | TTFT turn 1 ms | turn 2 | turn 5 | turn 10 | last turn / turn 1 | cached tokens, last turn |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r["ttft_ms_per_turn"]
        pick = [f"{t[i]:.0f}" if i < len(t) else "" for i in (0, 1, 4, 9)]
        lines.append(
            f"| {r['label']} | {' | '.join(pick)} | {r['last_over_first']:.2f} | {r['cached_tokens_per_turn'][-1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_target_arguments(p)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)
    if not 1 <= a.turns <= len(QUESTIONS) or a.rounds < 1:
        p.error(f"--turns from 1 to {len(QUESTIONS)}, --rounds >= 1")
    with targets(p, a, "tokenwire-chat-turns-") as (urls, labels):
        load = os.getloadavg()[0]
        # A new connection per request: some servers close an idle keep-alive connection between turns.
        with httpx.Client(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            models = [a.model or client.get(url + "/v1/models").json()["data"][0]["id"] for url in urls]
            for url, model in zip(urls, models, strict=True):
                chat(client, url, model, 1, 4, "warm-up")
            rounds: list[list[Chat]] = [[] for _ in urls]
            for i in range(a.rounds):
                order = list(range(len(urls)))
                for s in order if i % 2 == 0 else order[::-1]:
                    rounds[s].append(chat(client, urls[s], models[s], a.turns, a.max_tokens, f"chat {i}"))
    results = [summary(label, url, a.turns, r) for label, url, r in zip(labels, urls, rounds, strict=True)]
    for result in results:
        print(json.dumps(result), flush=True)
    # Greedy: servers that differ only in settings that must not change the text (a cache) answer alike.
    same = all(r["answers"] == results[0]["answers"] for r in results)
    if len(results) > 1:
        print(f"answers identical across servers: {same}", flush=True)
    if a.out:
        out = Path(a.out)
        table = markdown(results)
        if len(results) > 1:
            verdict = "yes" if same else "no"
            table += f"\n\nGreedy answers identical across the servers, every turn of every chat: {verdict}"
        meta = {"command": shlex.join(sys.argv), "cpu_count": os.cpu_count(), "loadavg_1m": [load, os.getloadavg()[0]]}
        out.write_text(
            json.dumps({"meta": meta, "answers_identical": same, "results": results, "markdown": table}, indent=2)
            + "\n"
        )
        out.with_suffix(".md").write_text(table + "\n")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
