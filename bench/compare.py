"""tokenwire against the tutorial's server, side by side, in one run on this machine.

Starts ``tokenwire serve`` (waits for ``GET /ready`` = 200), runs bench/loadgen.py's load at each ``--streams``
value, stops it; then does the same with bench/tutorial_server.py. Prints a Markdown table and writes every
result to ``--out`` (JSON) and the table next to it (``.md``); the servers' logs go next to it too.

    python bench/compare.py [--streams 1,8,32] [--max-tokens 64] [--out bench/results/compare-DATE.json]

By default both servers get exactly the same workload. ``--skip-tutorial-above N`` and ``--tutorial-max-tokens``
shorten the tutorial's runs (it serialises every request); the table then says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import loadgen

BENCH = Path(__file__).resolve().parent
READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    print(f"$ {' '.join(argv)}  (log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        # A session of its own, so that stop() can end the server and anything it started, by its id.
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=BENCH.parent, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(log_path: Path, n: int = 20) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen[bytes], port: int, http: bool, log_path: Path) -> float:
    """Wait (at most READY_TIMEOUT_S) for GET /ready = 200 (``http``) or an open TCP port; returns seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while starting:\n{_log_tail(log_path)}")
        try:
            if http:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return time.monotonic() - t0
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")


def run_server(
    name: str, argv: list[str], port: int, http_ready: bool, loads: list[loadgen.LoadConfig], log_path: Path
) -> list[dict[str, Any]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: list[dict[str, Any]] = []
    proc = start(argv, log_path, env)
    try:
        ready_s = wait_ready(proc, port, http_ready, log_path)
        print(f"{name} ready after {ready_s:.1f} s", flush=True)
        for cfg in loads:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_log_tail(log_path)}")
            summary = asyncio.run(loadgen.run_load(cfg))
            summary["server"] = name
            print(loadgen.format_summary(summary), flush=True)
            results.append(summary)
    finally:
        stop(proc)
    return results


def write_results(
    out: Path, args: argparse.Namespace, meta: dict[str, Any], results: list[dict[str, Any]], table: str, **extra: Any
) -> None:
    """Print the table; write it to ``out`` with ``.md``, and to ``out`` (JSON) with every result, ``extra``, the
    machine and the arguments."""
    print()
    print(table)
    meta = {
        **meta,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "streams_list"},
    }
    out.write_text(json.dumps({"meta": meta, **extra, "results": results, "markdown": table}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| streams | server | max_tokens | requests | errors | tok/s "
        "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["streams"], r["server"] != "tokenwire")):
        lines.append(
            f"| {r['streams']} | {r['server']} | {r['max_tokens']} | {r['requests']} | {r['errors']}"
            f"{' (timeout)' if r['timed_out'] else ''} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ttft_ms']['p50'])} | "
            f"{_fmt(r['ttft_ms']['p99'])} | {_fmt(r['itl_ms']['p50'])} | {_fmt(r['itl_ms']['p99'])} |"
        )
    lines += ["", "| streams | tokenwire tok/s | tutorial tok/s | tokenwire / tutorial |", "|---:|---:|---:|---:|"]
    by = {(r["server"], r["streams"]): r for r in results}
    for n in sorted({r["streams"] for r in results}):
        tw, tu = by.get(("tokenwire", n)), by.get(("tutorial", n))
        ratio = "-"
        if tw and tu and tu["tokens_per_s"] > 0:
            ratio = f"{tw['tokens_per_s'] / tu['tokens_per_s']:.1f}x"
            if (tw["max_tokens"], tw["requests"]) != (tu["max_tokens"], tu["requests"]):
                ratio += " (different workloads)"
        lines.append(
            f"| {n} | {_fmt(tw['tokens_per_s'], 1) if tw else '-'} | "
            f"{_fmt(tu['tokens_per_s'], 1) if tu else 'skipped'} | {ratio} |"
        )
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _tokenwire_cmd() -> list[str]:
    exe = shutil.which("tokenwire", path=str(Path(sys.executable).parent)) or shutil.which("tokenwire")
    return [exe] if exe else [sys.executable, "-m", "tokenwire.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokenwire vs the tutorial's server, side by side")
    p.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=loadgen.DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--requests-per-stream", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both servers (0: all cores)")
    p.add_argument("--model", default=None, help="--model for both servers (default: SmolLM2-135M-Instruct)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on each load run, seconds")
    p.add_argument("--skip-tutorial-above", type=int, default=None, help="no tutorial runs above N streams")
    p.add_argument("--tutorial-max-tokens", type=int, default=None, help="max_tokens for the tutorial's runs")
    p.add_argument("--skip-tutorial", action="store_true", help="run tokenwire only")
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/compare-DATE.json)")
    a = p.parse_args(argv)
    try:
        a.streams_list = sorted({int(s) for s in a.streams.split(",") if s.strip()})
    except ValueError:
        p.error(f"--streams {a.streams!r} is not a comma-separated list of integers")
    if not a.streams_list or min(a.streams_list) < 1 or a.max_tokens < 1 or a.requests_per_stream < 1:
        p.error("--streams values, --max-tokens and --requests-per-stream must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # Turn SIGTERM into an exception so that the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"compare-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def loads(url: str, mode: str, max_tokens: int, streams: list[int]) -> list[loadgen.LoadConfig]:
        return [
            loadgen.LoadConfig(
                url=url,
                streams=n,
                max_tokens=max_tokens,
                prompt=a.prompt,
                temperature=a.temperature,
                mode=mode,
                requests_per_stream=a.requests_per_stream,
                timeout=a.timeout,
                label=f"{mode} x{n}",
            )
            for n in streams
        ]

    model = ["--model", a.model] if a.model else []
    results: list[dict[str, Any]] = []
    failures: list[str] = []

    port = free_port()
    argv_tw = [*_tokenwire_cmd(), "serve", "--port", str(port), "--threads", str(a.threads), *model]
    try:
        results += run_server(
            "tokenwire",
            argv_tw,
            port,
            True,
            loads(f"ws://127.0.0.1:{port}/", "tokenwire", a.max_tokens, a.streams_list),
            out.with_suffix(".tokenwire.log"),
        )
    except RuntimeError as exc:
        failures.append(f"tokenwire: {exc}")
        print(f"tokenwire failed: {exc}", file=sys.stderr)

    tut_streams = [n for n in a.streams_list if a.skip_tutorial_above is None or n <= a.skip_tutorial_above]
    if tut_streams and not a.skip_tutorial:
        port = free_port()
        argv_tu = [sys.executable, str(BENCH / "tutorial_server.py"), "--port", str(port)]
        argv_tu += ["--threads", str(a.threads), *model]
        try:
            results += run_server(
                "tutorial",
                argv_tu,
                port,
                False,
                loads(f"ws://127.0.0.1:{port}/", "tutorial", a.tutorial_max_tokens or a.max_tokens, tut_streams),
                out.with_suffix(".tutorial.log"),
            )
        except RuntimeError as exc:
            failures.append(f"tutorial: {exc}")
            print(f"tutorial failed: {exc}", file=sys.stderr)

    meta = {"date": stamp, "git_commit": _git_commit()}
    write_results(out, a, meta, results, markdown(results), failures=failures)
    return 1 if failures or any(r["errors"] or r["timed_out"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
