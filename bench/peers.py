"""tokenwire against the servers a user would otherwise pick, side by side in one run on this machine.

Starts ``tokenwire serve`` (default model) and ``transformers serve --continuous-batching`` on the same weights
(tokenwire's converted copy of the GGUF, a plain model folder), and llama.cpp's ``llama-server`` on the GGUF
itself when ``--llama-server`` names its binary; see ../shared/PEERS.md for installing them outside this
repository. All stay up, idle between runs; the same load (bench/loadgen.py) then runs against each in turns,
``--rounds`` times per stream count, the order reversed every round so that the machine's drift hits all.
tokenwire is measured twice: over its WebSocket protocol and over the same OpenAI SSE endpoint as the peers.

    python bench/peers.py --transformers /tmp/peers-venv/bin/transformers --streams 1,8,32 --max-tokens 64

Prints a Markdown table (medians) with tokenwire / peer ratios and writes ``--out`` (JSON) and ``.md`` beside it.
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
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import loadgen
from compare import BENCH, free_port, start, stop, wait_ready, write_results

TOKENWIRE_WS, TOKENWIRE_SSE = "tokenwire (WebSocket)", "tokenwire (SSE)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokenwire against transformers serve and llama-server, in turns")
    p.add_argument("--transformers", default=None, help="the `transformers` command of a venv with [serving]")
    p.add_argument("--transformers-dtype", default="float32", help="its --dtype (PEERS.md: float32)")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (optional)")
    p.add_argument("--llama-parallel", type=int, default=32, help="its --parallel (slots)")
    p.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt", default=loadgen.DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--tokenwire-args", default="", help="more flags for tokenwire serve, one string")
    p.add_argument("--timeout", type=float, default=600.0, help="per load run")
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/peers-DATE.json)")
    a = p.parse_args(argv)
    a.streams_list = sorted({int(s) for s in a.streams.split(",") if s.strip()})
    if not a.streams_list or min(a.streams_list) < 1 or a.max_tokens < 1 or a.rounds < 1:
        p.error("--streams values, --max-tokens and --rounds must be >= 1")
    if not a.transformers and not a.llama_server:
        p.error("name at least one peer: --transformers and/or --llama-server")
    return a


def default_model() -> tuple[Path, Path]:
    """The default model's GGUF file and tokenwire's converted folder of it (converted now if need be)."""
    from tokenwire.engine.hf.loader import local_folder
    from tokenwire.engine.models import resolve

    resolved = resolve(None)
    assert resolved.gguf_file is not None
    return Path(resolved.path) / resolved.gguf_file, Path(local_folder(resolved))


def served_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


def markdown(results: list[dict[str, Any]], peers: list[str]) -> str:
    lines = [
        "| streams | server | runs | tok/s (median) | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    head = "| streams | " + " | ".join(f"{tw} / {peer} tok/s" for peer in peers for tw in ("WS", "SSE")) + " |"
    ratios = ["", head, "|---:|" + "---:|" * (2 * len(peers))]
    for n in sorted({r["streams"] for r in results}):
        tps: dict[str, float] = {}
        for server in [TOKENWIRE_WS, TOKENWIRE_SSE, *peers]:
            rs = [r for r in results if r["streams"] == n and r["server"] == server]
            if not rs:
                continue
            tps[server] = statistics.median(r["tokens_per_s"] for r in rs)

            def med(key: str, q: str, rs: list[dict[str, Any]] = rs) -> str:
                values = [r[key][q] for r in rs if r[key][q] is not None]
                return f"{statistics.median(values):.0f}" if values else "-"

            lines.append(
                f"| {n} | {server} | {len(rs)} | {tps[server]:.1f} | {med('ttft_ms', 'p50')} | {med('ttft_ms', 'p99')} "
                f"| {med('itl_ms', 'p50')} | {med('itl_ms', 'p99')} | {sum(r['errors'] for r in rs)} |"
            )
        cells = [
            f"{tps[tw] / tps[peer]:.2f}" if tps.get(peer) and tps.get(tw) else "-"
            for peer in peers
            for tw in (TOKENWIRE_WS, TOKENWIRE_SSE)
        ]
        ratios.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ratios)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"peers-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf, folder = default_model()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, tuple[str, str, str]] = {}  # server -> (mode, url, model)
    results: list[dict[str, Any]] = []
    peers: list[str] = []
    try:
        port = free_port()
        argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port), *a.tokenwire_args.split()]
        procs.append(start(argv_tw, out.with_suffix(".tokenwire.log"), env))
        wait_ready(procs[-1], port, True, out.with_suffix(".tokenwire.log"))
        model = served_model(port)
        targets[TOKENWIRE_WS] = ("tokenwire", f"ws://127.0.0.1:{port}/", model)
        targets[TOKENWIRE_SSE] = ("openai", f"http://127.0.0.1:{port}", model)
        if a.transformers:
            port = free_port()
            name = f"transformers serve ({a.transformers_dtype})"
            argv_tf = [a.transformers, "serve", str(folder), "--continuous-batching", "--dtype", a.transformers_dtype]
            argv_tf += ["--host", "127.0.0.1", "--port", str(port)]
            procs.append(start(argv_tf, out.with_suffix(".transformers.log"), env))
            wait_ready(procs[-1], port, False, out.with_suffix(".transformers.log"))
            targets[name] = ("openai", f"http://127.0.0.1:{port}", str(folder))
            peers.append(name)
        if a.llama_server:
            port = free_port()
            name = f"llama-server (Q4_1, --parallel {a.llama_parallel})"
            argv_ll = [a.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2"]
            argv_ll += ["--parallel", str(a.llama_parallel), "-c", str(512 * a.llama_parallel), "--no-webui"]
            lib = str(Path(a.llama_server).resolve().parent)
            procs.append(start(argv_ll, out.with_suffix(".llama.log"), dict(env, LD_LIBRARY_PATH=lib)))
            wait_ready(procs[-1], port, False, out.with_suffix(".llama.log"))
            targets[name] = ("openai", f"http://127.0.0.1:{port}", "default")
            peers.append(name)
        order = list(targets)
        for n in a.streams_list:
            for turn in range(a.rounds):
                for server in order if turn % 2 == 0 else order[::-1]:
                    mode, url, model = targets[server]
                    cfg = loadgen.LoadConfig(
                        url=url,
                        streams=n,
                        max_tokens=a.max_tokens,
                        prompt=a.prompt,
                        temperature=a.temperature,
                        mode=mode,
                        model=model,
                        timeout=a.timeout,
                        label=f"{server} x{n}",
                    )
                    summary = asyncio.run(loadgen.run_load(cfg))
                    summary["server"] = server
                    print(loadgen.format_summary(summary), flush=True)
                    results.append(summary)
    finally:
        for proc in procs:
            stop(proc)
    meta = {"date": stamp, "model_folder": str(folder), "gguf": str(gguf)}
    write_results(out, a, meta, results, markdown(results, peers))
    return 1 if any(r["errors"] or r["timed_out"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
