"""tokenwire against the servers a user would otherwise pick, side by side in one run on this machine.

Starts ``tokenwire serve`` (default model) on each engine of ``--engines``, ``transformers serve
--continuous-batching`` on the same weights (tokenwire's converted copy of the GGUF, a plain model folder) when
``--transformers`` names its command, and llama.cpp's ``llama-server`` on the GGUF itself when ``--llama-server``
names its binary; see ../shared/PEERS.md for installing them outside this repository. All stay up, idle between
runs; the same load (bench/loadgen.py) then runs against each in turns, ``--rounds`` times per stream count, the
order reversed every round so that the machine's drift hits all; ``--warmup-rounds`` untimed rounds go first at
each stream count. The first engine is measured twice: over
tokenwire's WebSocket protocol and over the same OpenAI SSE endpoint as the peers. ``--in-process`` adds OpenVINO
GenAI's pipeline run in process with no server (bench/ov_pipeline.py): the ceiling for the OpenVINO engine.

    python bench/peers.py --llama-server /tmp/llama.cpp/build/bin/llama-server --engines openvino,transformers \
        --in-process --streams 1,8,32,64 --max-tokens 64

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

IN_PROCESS = "OpenVINO pipeline in process (no server)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokenwire against transformers serve and llama-server, in turns")
    p.add_argument("--engines", default="openvino", help="tokenwire engines to run, comma-separated (first: WS + SSE)")
    p.add_argument("--in-process", action="store_true", help="also OpenVINO's pipeline in process (the ceiling)")
    p.add_argument("--transformers", default=None, help="the `transformers` command of a venv with [serving]")
    p.add_argument("--transformers-dtype", default="float32", help="its --dtype (PEERS.md: float32)")
    p.add_argument("--transformers-args", default="", help="more flags for transformers serve, one string")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (optional)")
    p.add_argument(
        "--model",
        default=None,
        help="a model folder for tokenwire and transformers serve (default: the default model's converted folder)",
    )
    p.add_argument("--llama-parallel", type=int, default=32, help="its --parallel (slots)")
    p.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=0,
        help="untimed rounds against every server before the timed ones, at each stream count (on a GPU the first "
        "run of a new batch shape is 2-3x slower: docs/benchmarks.md)",
    )
    p.add_argument("--prompt", default=loadgen.DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--tokenwire-args", default="", help="more flags for tokenwire serve, one string")
    p.add_argument("--timeout", type=float, default=600.0, help="per load run")
    p.add_argument("--out", default=None, help="JSON result (default: bench/results/peers-DATE.json)")
    a = p.parse_args(argv)
    a.streams_list = sorted({int(s) for s in a.streams.split(",") if s.strip()})
    if not a.streams_list or min(a.streams_list) < 1 or a.max_tokens < 1 or a.rounds < 1:
        p.error("--streams values, --max-tokens and --rounds must be >= 1")
    if a.warmup_rounds < 0:
        p.error("--warmup-rounds must be >= 0")
    a.engines_list = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not a.engines_list:
        p.error("--engines names no engine")
    return a


def default_gguf() -> Path:
    from tokenwire.engine.models import resolve

    resolved = resolve(None)
    assert resolved.gguf_file is not None
    return Path(resolved.path) / resolved.gguf_file


def converted_folder() -> Path:
    """tokenwire's converted folder of the default model (converted now if need be), for transformers serve."""
    from tokenwire.engine.hf.loader import local_folder
    from tokenwire.engine.models import resolve

    return Path(local_folder(resolve(None)))


def cpu_model() -> dict[str, Any]:
    """Which CPU the figures come from (it changes between sessions): its name and its vector extensions."""
    name, flags = "", ""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {"name": name, "cores": os.cpu_count(), "flags": [x for x in wanted if x in flags.split()]}


def gpu_model() -> str | None:
    """The GPU the figures come from, as nvidia-smi names it (None where there is none)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def in_process(n: int, a: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """One run of bench/ov_pipeline.py (its own process: nothing else shares its GIL)."""
    argv = [sys.executable, str(Path(__file__).with_name("ov_pipeline.py")), "--streams", str(n)]
    argv += ["--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature), "--prompt", a.prompt]
    with log_path.open("ab") as log:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, timeout=a.timeout, check=True)
    summary: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    summary["label"] = f"{IN_PROCESS} x{n}"
    return summary


def save_metrics(base: str, path: Path) -> None:
    """What a tokenwire server counted over the whole run (/metrics, then /v1/stats): flow-control pauses, queue
    times, messages sent; read before it stops."""
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            text = r.read().decode()
        with urllib.request.urlopen(f"{base}/v1/stats", timeout=10) as r:
            text += "\n" + r.read().decode() + "\n"
    except OSError as exc:
        text = f"could not read the metrics: {exc}\n"
    path.write_text(text)


def served_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


def markdown(results: list[dict[str, Any]], ours: list[str], others: list[str]) -> str:
    lines = [
        "| streams | server | runs | tok/s (median) | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = [(tw, other) for other in others for tw in ours]
    head = "| streams | " + " | ".join(f"{tw} / {other} tok/s" for tw, other in pairs) + " |"
    ratios = ["", head, "|---:|" + "---:|" * len(pairs)]
    for n in sorted({r["streams"] for r in results}):
        tps: dict[str, float] = {}
        for server in [*ours, *others]:
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
        cells = [f"{tps[tw] / tps[o]:.2f}" if tps.get(o) and tps.get(tw) else "-" for tw, o in pairs]
        ratios.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ratios)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else BENCH / "results" / f"peers-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = default_gguf() if a.llama_server else None
    folder = Path(a.model) if a.model else converted_folder() if a.transformers else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, tuple[str, str, str]] = {}  # server -> (mode, url, model)
    results: list[dict[str, Any]] = []
    ours: list[str] = []
    peers: list[str] = []
    try:
        for i, engine in enumerate(a.engines_list):
            port = free_port()
            argv_tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port), "--engine", engine]
            argv_tw += ["--model", str(folder)] if a.model else []
            argv_tw += a.tokenwire_args.split()
            log_path = out.with_suffix(f".tokenwire-{engine}.log")
            procs.append(start(argv_tw, log_path, env))
            wait_ready(procs[-1], port, True, log_path)
            model = served_model(port)
            targets[f"tokenwire {engine} (WebSocket)"] = ("tokenwire", f"ws://127.0.0.1:{port}/", model)
            ours.append(f"tokenwire {engine} (WebSocket)")
            if i == 0:
                targets[f"tokenwire {engine} (SSE)"] = ("openai", f"http://127.0.0.1:{port}", model)
                ours.append(f"tokenwire {engine} (SSE)")
        if a.transformers:
            assert folder is not None
            port = free_port()
            name = f"transformers serve ({a.transformers_dtype})"
            argv_tf = [a.transformers, "serve", str(folder), "--continuous-batching", "--dtype", a.transformers_dtype]
            argv_tf += ["--host", "127.0.0.1", "--port", str(port), *a.transformers_args.split()]
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
        if a.in_process:
            peers.append(IN_PROCESS)
        order = [*targets, *([IN_PROCESS] if a.in_process else [])]
        for n in a.streams_list:
            for turn in range(a.warmup_rounds + a.rounds):
                timed = turn >= a.warmup_rounds
                for server in order if turn % 2 == 0 else order[::-1]:
                    if server == IN_PROCESS:
                        summary = in_process(n, a, out.with_suffix(".in-process.log"))
                        summary["server"] = server
                        line = loadgen.format_summary({**summary, "requests": n, "completed": n})
                    else:
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
                        line = loadgen.format_summary(summary)
                    print(line if timed else f"(warm-up, not counted) {line}", flush=True)
                    if timed:
                        results.append(summary)
    finally:
        for server, (mode, url, _) in targets.items():
            if server.startswith("tokenwire") and mode == "tokenwire":
                base = url.replace("ws://", "http://").rstrip("/")
                save_metrics(base, out.with_suffix(f".{server.split()[1]}.metrics"))
        for proc in procs:
            stop(proc)
    meta = {"date": stamp, "model_folder": str(folder), "gguf": str(gguf), "cpu": cpu_model(), "gpu": gpu_model()}
    write_results(out, a, meta, results, markdown(results, ours, peers))
    return 1 if any(r["errors"] or r["timed_out"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
