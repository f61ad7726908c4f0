"""Asyncio load generator: tokenwire's WebSocket protocol, the tutorial-style baseline, or OpenAI-style SSE.

N concurrent connections each run R ``generate`` requests one after another. Per request it records the send
time, the first token message (TTFT), every later token message (inter-token latency = the gaps between
consecutive token messages of that request) and the token count, and ends at ``complete`` (or ``error``).

    python bench/loadgen.py --url ws://127.0.0.1:8765/ --streams 8 --max-tokens 64 \\
        --prompt "Write a long story about a dragon who learns to paint." --json out.json

Token counting: in ``tokenwire`` mode the ``tokens`` field of each ``token``/``tokens`` message (1 when absent);
in ``tutorial`` mode 1 per ``token`` message; in ``openai`` mode (``POST /v1/chat/completions`` with
``stream: true`` to ``--url http://127.0.0.1:PORT``, any OpenAI-compatible server) the ``usage`` the server
reports at the end (``stream_options.include_usage``), else 1 per chunk with content; TTFT and inter-token
latency come from the chunks that carry content. Aggregate tokens/s = all tokens / (last end - first send).
Everything is bounded by ``--timeout``: when it expires the run is aborted and what was measured is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

DEFAULT_PROMPT = "Write a long story about a dragon who learns to paint."
TOKEN_TYPES = ("token", "tokens")


@dataclass(slots=True, frozen=True)
class LoadConfig:
    url: str
    streams: int = 1
    max_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.7
    top_p: float | None = None  # sent when set (a nucleus, as chat front ends send)
    mode: str = "tokenwire"  # or "tutorial", or "openai" (SSE)
    model: str = ""  # the "model" field in openai mode
    requests_per_stream: int = 1
    warmup: bool = True
    timeout: float = 600.0
    label: str = ""


@dataclass(slots=True)
class RequestRecord:
    stream: int
    index: int
    send: float = 0.0
    first: float | None = None  # first token message
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float | None = None
    error: str | None = None
    finish_reason: str | None = None
    usage_completion_tokens: int | None = None  # tokenwire's own count, from ``complete``

    @property
    def done(self) -> bool:
        return self.end is not None and self.error is None


def check_url(url: str, mode: str = "tokenwire") -> None:
    parts = urlsplit(url)
    scheme = "http" if mode == "openai" else "ws"
    if parts.scheme != scheme or parts.hostname != "127.0.0.1":
        raise SystemExit(f"refusing {url!r}: only {scheme}://127.0.0.1:PORT/ is allowed in {mode} mode")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms_stats(seconds: list[float]) -> dict[str, float | None]:
    ms = [v * 1000.0 for v in seconds]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    return {
        "p50": None if p50 is None else round(p50, 2),
        "p99": None if p99 is None else round(p99, 2),
        "mean": round(sum(ms) / len(ms), 2) if ms else None,
        "n": len(ms),
    }


def _payload(cfg: LoadConfig, gen_id: str, max_tokens: int) -> str:
    msg: dict[str, Any] = {
        "type": "generate",
        "prompt": cfg.prompt,
        "max_tokens": max_tokens,
        "max_length": max_tokens,  # the tutorial server's name for it
        "temperature": cfg.temperature,
    }
    if cfg.top_p is not None:
        msg["top_p"] = cfg.top_p
    if cfg.mode == "tokenwire":
        msg["id"] = gen_id
    return json.dumps(msg)


async def run_request(ws: ClientConnection, cfg: LoadConfig, rec: RequestRecord, gen_id: str, max_tokens: int) -> None:
    """Send one ``generate`` and read its messages until ``complete`` or ``error`` (fills ``rec``)."""
    tokenwire = cfg.mode == "tokenwire"
    rec.send = time.perf_counter()
    await ws.send(_payload(cfg, gen_id, max_tokens))
    while True:
        raw = await ws.recv()
        now = time.perf_counter()
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "ping":
            await ws.send(json.dumps({"type": "pong", "ts": msg.get("ts")}))
            continue
        if tokenwire and msg.get("id") not in (None, gen_id):
            continue  # another generation's message (not expected: one generation at a time per socket)
        if kind in TOKEN_TYPES:
            if rec.first is None:
                rec.first = now
            rec.token_times.append(now)
            n = msg.get("tokens") if tokenwire else None
            rec.tokens += n if isinstance(n, int) else 1
        elif kind == "complete":
            rec.end = now
            rec.finish_reason = msg.get("finish_reason")
            usage = msg.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                rec.usage_completion_tokens = usage["completion_tokens"]
            return
        elif kind == "error":
            rec.end = now
            rec.error = f"{msg.get('code', 'error')}: {msg.get('content', '')}"
            return
        # hello, started, pong and unknown types are ignored


async def run_sse_request(client: Any, cfg: LoadConfig, rec: RequestRecord, max_tokens: int) -> None:
    """One streamed chat completion (OpenAI SSE), read to its end (fills ``rec``)."""
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": cfg.prompt}],
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"top_p": cfg.top_p} if cfg.top_p is not None else {}),
    }
    chunks = 0
    rec.send = time.perf_counter()
    async with client.stream("POST", cfg.url.rstrip("/") + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            rec.end = time.perf_counter()
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            msg = json.loads(data)
            if "error" in msg:
                rec.error = str(msg["error"])[:200]
                break
            for choice in msg.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    if rec.first is None:
                        rec.first = now
                    rec.token_times.append(now)
                    chunks += 1
                rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
            usage = msg.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                rec.usage_completion_tokens = usage["completion_tokens"]
    rec.end = time.perf_counter()
    rec.tokens = rec.usage_completion_tokens if rec.usage_completion_tokens is not None else chunks


async def run_sse_stream(cfg: LoadConfig, stream: int, records: list[RequestRecord]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout)) as client:
        for i in range(cfg.requests_per_stream):
            rec = RequestRecord(stream, i)
            records.append(rec)
            try:
                await run_sse_request(client, cfg, rec, cfg.max_tokens)
            except Exception as exc:  # connection refused or dropped: record it and stop this stream
                rec.end = time.perf_counter()
                rec.error = f"{type(exc).__name__}: {exc}"
                return


def _connect(cfg: LoadConfig) -> Any:
    # No client keepalive pings: the tutorial server blocks its event loop while generating, and a missed
    # pong must not be what ends a measurement.
    # A server that serves one request at a time on its event loop (the tutorial's) accepts new connections
    # only between requests: wait for the handshake as long as the whole run may take, not 30 s.
    return connect(cfg.url, ping_interval=None, open_timeout=cfg.timeout, close_timeout=5, max_size=None)


async def run_stream(cfg: LoadConfig, stream: int, records: list[RequestRecord]) -> None:
    if cfg.mode == "openai":
        await run_sse_stream(cfg, stream, records)
        return
    async with _connect(cfg) as ws:
        for i in range(cfg.requests_per_stream):
            rec = RequestRecord(stream, i)
            records.append(rec)
            try:
                await run_request(ws, cfg, rec, f"s{stream}-r{i}", cfg.max_tokens)
            except Exception as exc:  # connection dropped, bad frame: record it and stop this stream
                rec.end = time.perf_counter()
                rec.error = f"{type(exc).__name__}: {exc}"
                return


async def warmup(cfg: LoadConfig) -> None:
    if cfg.mode == "openai":
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout)) as client:
            rec = RequestRecord(-1, 0)
            await run_sse_request(client, cfg, rec, min(4, cfg.max_tokens))
        if rec.error:
            raise RuntimeError(f"warm-up request failed: {rec.error}")
        return
    async with _connect(cfg) as ws:
        rec = RequestRecord(-1, 0)
        await run_request(ws, cfg, rec, "warmup", min(4, cfg.max_tokens))
        if rec.error:
            raise RuntimeError(f"warm-up request failed: {rec.error}")


def summarize(cfg: LoadConfig, records: list[RequestRecord], timed_out: bool, abort_time: float) -> dict[str, Any]:
    for rec in records:  # requests still open at the abort
        if rec.end is None:
            rec.end = abort_time
            rec.error = "timeout"
    sent = [r for r in records if r.send > 0]
    tokens = sum(r.tokens for r in sent)
    wall = (max(r.end or 0.0 for r in sent) - min(r.send for r in sent)) if sent else 0.0
    itl = [b - a for r in sent for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    usage = [r.usage_completion_tokens for r in sent if r.usage_completion_tokens is not None]
    errors = [r.error for r in sent if r.error]
    return {
        "label": cfg.label,
        "url": cfg.url,
        "mode": cfg.mode,
        "streams": cfg.streams,
        "requests_per_stream": cfg.requests_per_stream,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "prompt": cfg.prompt,
        "requests": cfg.streams * cfg.requests_per_stream,
        "completed": sum(r.done for r in sent),
        "errors": len(errors) + (cfg.streams * cfg.requests_per_stream - len(sent)),
        "error_samples": sorted(set(errors))[:5],
        "timed_out": timed_out,
        "tokens": tokens,
        "usage_completion_tokens": sum(usage) if usage else None,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_ms": _ms_stats([r.first - r.send for r in sent if r.first is not None]),
        "itl_ms": _ms_stats(itl),
        "latency_ms": _ms_stats([r.end - r.send for r in sent if r.done and r.end is not None]),
        "finish_reasons": {k: sum(r.finish_reason == k for r in sent) for k in {r.finish_reason for r in sent} if k},
    }


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run the whole load (warm-up included) within ``cfg.timeout`` seconds and return the summary."""
    check_url(cfg.url, cfg.mode)
    records: list[RequestRecord] = []
    timed_out = False
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: keep a trace of it
    deadline = asyncio.get_running_loop().time() + cfg.timeout
    failures: list[str] = []
    try:
        async with asyncio.timeout_at(deadline):
            if cfg.warmup:
                await warmup(cfg)
            results = await asyncio.gather(
                *(run_stream(cfg, s, records) for s in range(cfg.streams)), return_exceptions=True
            )
            failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    except TimeoutError:
        timed_out = True
    except Exception as exc:  # the warm-up failed: server down, handshake refused, an error message
        failures = [f"warm-up: {type(exc).__name__}: {exc}"]
    summary = summarize(cfg, records, timed_out, time.perf_counter())
    summary["loadavg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    if failures:  # e.g. a connection that could not be opened
        summary["error_samples"] = sorted(set(summary["error_samples"] + failures))[:5]
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"[{s['label'] or s['mode']}] streams={s['streams']} requests={s['requests']} "
        f"completed={s['completed']} errors={s['errors']}{' TIMEOUT' if s['timed_out'] else ''} "
        f"tokens={s['tokens']} wall={s['wall_s']:.2f}s tok/s={s['tokens_per_s']:.2f} "
        f"ttft p50/p99={f(s['ttft_ms']['p50'])}/{f(s['ttft_ms']['p99'])}ms "
        f"itl p50/p99={f(s['itl_ms']['p50'])}/{f(s['itl_ms']['p99'])}ms"
    )


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, str | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/, or http://127.0.0.1:PORT in openai mode")
    p.add_argument("--streams", type=int, default=1, help="concurrent connections")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=None, help="top_p, sent when given")
    p.add_argument("--mode", choices=("tokenwire", "tutorial", "openai"), default="tokenwire")
    p.add_argument("--model", default="", help='the "model" field in openai mode')
    p.add_argument("--requests-per-stream", type=int, default=1)
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="one short request first")
    p.add_argument("--timeout", type=float, default=600.0, help="abort the whole run after this many seconds")
    p.add_argument("--json", dest="json_out", default=None, help="write the result here")
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    if a.streams < 1 or a.requests_per_stream < 1 or a.max_tokens < 1 or a.timeout <= 0:
        p.error("--streams, --requests-per-stream and --max-tokens must be >= 1, --timeout > 0")
    cfg = LoadConfig(
        url=a.url,
        streams=a.streams,
        max_tokens=a.max_tokens,
        prompt=a.prompt,
        temperature=a.temperature,
        top_p=a.top_p,
        mode=a.mode,
        model=a.model,
        requests_per_stream=a.requests_per_stream,
        warmup=a.warmup,
        timeout=a.timeout,
        label=a.label,
    )
    check_url(cfg.url, cfg.mode)
    return cfg, a.json_out


def main(argv: list[str] | None = None) -> int:
    cfg, json_out = parse_args(argv)
    summary = asyncio.run(run_load(cfg))
    print(format_summary(summary))
    text = json.dumps(summary, indent=2)
    if json_out:
        with open(json_out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 1 if summary["errors"] or summary["timed_out"] else 0


if __name__ == "__main__":
    sys.exit(main())
