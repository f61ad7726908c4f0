"""A 10-turn chat with a long system prompt: does turn 10 start as fast as turn 1?

Each turn sends the whole conversation so far (system prompt, every question and answer) to an OpenAI-compatible
``/v1/chat/completions`` endpoint, streamed, and times the first content chunk. Without prefix caching a server
recomputes the growing history every turn; with it, turn 10 costs about what turn 1 does. Works against
tokenwire and llama-server alike. Prints one JSON object: TTFT per turn (median over ``--rounds`` chats) and
turn 10 / turn 1.

    python bench/chat_turns.py --url http://127.0.0.1:8765 [--turns 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import httpx

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


def turn(
    client: httpx.Client, url: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first: float | None = None
    text = ""
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            piece = (choices[0].get("delta") or {}).get("content") if choices else None
            if piece:
                if first is None:
                    first = time.perf_counter()
                text += piece
    return ((first or time.perf_counter()) - start) * 1000, text


def chat(client: httpx.Client, url: str, model: str, turns: int, max_tokens: int, tag: str) -> list[float]:
    # A tag in the system prompt makes every chat new to the server's cache (nothing from an earlier round).
    messages = [{"role": "system", "content": f"[{tag}] {SYSTEM}"}]
    ttfts = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        ttft, answer = turn(client, url, model, messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": answer})
    return ttfts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    p.add_argument("--model", default="", help="the model field (default: the first of /v1/models)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    if not 1 <= a.turns <= len(QUESTIONS) or a.rounds < 1:
        p.error(f"--turns from 1 to {len(QUESTIONS)}, --rounds >= 1")
    # A new connection per request: some servers close an idle keep-alive connection between turns.
    with httpx.Client(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        if not a.model:
            a.model = client.get(a.url + "/v1/models").json()["data"][0]["id"]
        chat(client, a.url, a.model, 1, 4, "warm-up")
        rounds = [chat(client, a.url, a.model, a.turns, a.max_tokens, f"chat {i}") for i in range(a.rounds)]
    per_turn = [round(statistics.median(r[t] for r in rounds), 1) for t in range(a.turns)]
    result = {
        "label": a.label,
        "url": a.url,
        "turns": a.turns,
        "rounds": a.rounds,
        "ttft_ms_per_turn": per_turn,
        "last_over_first": round(per_turn[-1] / per_turn[0], 2),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
