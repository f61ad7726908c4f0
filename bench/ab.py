"""Two revisions of tokenwire side by side, in one run on this machine: did a change make streaming slower?

Exports each git revision (``--a``, ``--b``; ``WORKTREE`` means the files as they are now) into a temporary
folder, starts ``tokenwire serve`` from each (``PYTHONPATH`` = that folder's ``src``, the same venv), and runs
the same bench/loadgen.py load against them in turns, A B A B ..., so that drift of the machine hits both.
Prints a Markdown table with B/A ratios and writes every result to ``--out`` (JSON) and ``.md`` next to it.

    python bench/ab.py --a HEAD~1 --b WORKTREE --streams 1,32 --max-tokens 128 --rounds 3

The same revision with two settings: ``--a WORKTREE --b WORKTREE --b-args "--ws-compression none"``. Besides the
client's figures, each run records the server's CPU time per 1,000 tokens streamed and its resident memory, and
``--idle-connections N`` measures the server memory that N open, idle WebSockets take (each offers
permessage-deflate, as browsers do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import loadgen
from compare import BENCH, free_port, start, stop, wait_ready, write_results

WORKTREE = "WORKTREE"


def served_model(http_url: str) -> str:
    """The model id a server's ``GET /v1/models`` names (the openai mode sends it)."""
    with urllib.request.urlopen(http_url + "/v1/models", timeout=30) as r:
        return str(json.load(r)["data"][0]["id"])


def export(rev: str, into: Path) -> str:
    """Put revision ``rev`` of the repository into ``into``; returns the commit (or WORKTREE)."""
    repo = BENCH.parent
    if rev == WORKTREE:
        files = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        for name in filter(None, files):
            src, dst = repo / name.decode(), into / name.decode()
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
        return WORKTREE
    commit = subprocess.run(
        ["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=repo, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="two revisions of tokenwire under the same load, in turns")
    p.add_argument("--a", default="HEAD", help="git revision A (the baseline), or WORKTREE")
    p.add_argument("--b", default=WORKTREE, help="git revision B (the change), or WORKTREE")
    p.add_argument("--streams", default="1,32", help="comma-separated concurrent stream counts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="A B turns per stream count")
    p.add_argument("--prompt", default=loadgen.DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=None, help="top_p for every request, sent when given")
    p.add_argument("--model", default=None, help="--model for both (default: SmolLM2-135M-Instruct)")
    p.add_argument("--server-args", default="", help="more flags for both servers, one string")
    p.add_argument("--a-args", default="", help="more flags for server A only")
    p.add_argument("--b-args", default="", help="more flags for server B only")
    p.add_argument(
        "--mode",
        default="tokenwire",
        choices=("tokenwire", "openai"),
        help="tokenwire: the WebSocket protocol; openai: POST /v1/chat/completions streamed as SSE",
    )
    p.add_argument("--idle-connections", type=int, default=0, help="measure memory per idle WebSocket (N <= 5000)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/ab-DATE.json)")
    a = p.parse_args(argv)
    a.streams_list = sorted({int(s) for s in a.streams.split(",") if s.strip()})
    if not a.streams_list or min(a.streams_list) < 1 or a.max_tokens < 1 or a.rounds < 1:
        p.error("--streams values, --max-tokens and --rounds must be >= 1")
    if not 0 <= a.idle_connections <= 5000:
        p.error("--idle-connections must be between 0 and 5000")
    return a


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def idle_connections_kb(url: str, pid: int, n: int) -> float:
    """Server memory per open, idle WebSocket: RSS with ``n`` of them open (each past its hello) minus before."""
    from websockets.asyncio.client import connect

    before = rss_mb(pid)
    socks = []
    try:
        for _ in range(n):
            ws = await connect(url, ping_interval=None, open_timeout=30)
            await asyncio.wait_for(ws.recv(), 30)  # hello
            socks.append(ws)
        await asyncio.sleep(1.0)
        return (rss_mb(pid) - before) * 1024 / n
    finally:
        await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)


def markdown(results: list[dict[str, Any]], names: dict[str, str], idle: dict[str, float]) -> str:
    lines = [
        "| streams | build | runs | tok/s (median) | TTFT p50 ms | ITL p50 ms | ITL p99 ms | server CPU ms / 1k tok "
        "| server RSS MB | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = ["", "| streams | B / A tok/s | B / A ITL p50 | B / A server CPU per token |", "|---:|---:|---:|---:|"]
    for n in sorted({r["streams"] for r in results}):
        med: dict[str, dict[str, float]] = {}
        for build in ("A", "B"):
            rs = [r for r in results if r["streams"] == n and r["build"] == build]
            m = {
                "tps": statistics.median(r["tokens_per_s"] for r in rs),
                "ttft": statistics.median(r["ttft_ms"]["p50"] or 0 for r in rs),
                "itl": statistics.median(r["itl_ms"]["p50"] or 0 for r in rs),
                "itl99": statistics.median(r["itl_ms"]["p99"] or 0 for r in rs),
                "cpu": statistics.median(r["server_cpu_ms_per_1k_tokens"] for r in rs),
                "rss": max(r["server_rss_mb"] for r in rs),
            }
            med[build] = m
            errors = sum(r["errors"] for r in rs)
            lines.append(
                f"| {n} | {build} ({names[build]}) | {len(rs)} | {m['tps']:.1f} | {m['ttft']:.0f} | "
                f"{m['itl']:.1f} | {m['itl99']:.1f} | {m['cpu']:.0f} | {m['rss']:.0f} | {errors} |"
            )
        itl = med["B"]["itl"] / med["A"]["itl"] if med["A"]["itl"] else float("nan")
        cpu = med["B"]["cpu"] / med["A"]["cpu"] if med["A"]["cpu"] else float("nan")
        ratios.append(f"| {n} | {med['B']['tps'] / med['A']['tps']:.3f} | {itl:.3f} | {cpu:.3f} |")
    if idle:
        ratios += ["", "| build | server memory per idle WebSocket, KB |", "|---|---:|"]
        ratios += [f"| {build} ({names[build]}) | {kb:.1f} |" for build, kb in idle.items()]
    return "\n".join(lines + ratios)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"ab-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    names: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tokenwire-ab-") as tmp:
        urls = {}
        try:
            for build, rev in (("A", a.a), ("B", a.b)):
                tree = Path(tmp) / build
                tree.mkdir()
                names[build] = f"{rev} = {export(rev, tree)[:12]}"
                port = free_port()
                env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(tree / "src"))
                argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port)]
                argv_tw += (["--model", a.model] if a.model else []) + a.server_args.split()
                argv_tw += (a.a_args if build == "A" else a.b_args).split()
                names[build] += f" {' '.join(argv_tw[6:])}".rstrip()
                log_path = out.with_suffix(f".{build}.log")
                print(f"{build}: {names[build]}", flush=True)
                proc = start(argv_tw, log_path, env)
                procs.append(proc)
                wait_ready(proc, port, True, log_path)
                urls[build] = f"ws://127.0.0.1:{port}/" if a.mode == "tokenwire" else f"http://127.0.0.1:{port}"
            pids = {"A": procs[0].pid, "B": procs[1].pid}
            idle: dict[str, float] = {}
            for build in ("A", "B") if a.idle_connections else ():
                idle[build] = asyncio.run(idle_connections_kb(urls[build], pids[build], a.idle_connections))
                print(f"{build}: {idle[build]:.1f} KB per idle WebSocket", flush=True)
            for n in a.streams_list:
                for turn in range(a.rounds):
                    for build in ("A", "B") if turn % 2 == 0 else ("B", "A"):
                        cfg = loadgen.LoadConfig(
                            url=urls[build],
                            streams=n,
                            max_tokens=a.max_tokens,
                            prompt=a.prompt,
                            temperature=a.temperature,
                            top_p=a.top_p,
                            mode=a.mode,
                            model=served_model(urls[build]) if a.mode == "openai" else "",
                            timeout=a.timeout,
                            label=f"{build} x{n}",
                        )
                        cpu_before = cpu_seconds(pids[build])
                        summary = asyncio.run(loadgen.run_load(cfg))
                        cpu_ms = (cpu_seconds(pids[build]) - cpu_before) * 1000
                        summary["server_cpu_ms_per_1k_tokens"] = cpu_ms * 1000 / max(1, summary["tokens"])
                        summary["server_rss_mb"] = rss_mb(pids[build])
                        summary["build"] = build
                        print(loadgen.format_summary(summary), flush=True)
                        results.append(summary)
        finally:
            for proc in procs:
                stop(proc)
    meta = {"date": stamp, "idle_connection_kb": idle, "builds": names}
    write_results(out, a, meta, results, markdown(results, names, idle))
    return 1 if any(r["errors"] or r["timed_out"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
