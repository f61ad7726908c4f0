"""Where one stream's decode step goes on the OpenVINO engine: the pipeline against the bare model, and per node kind.

In one process and in turns, on the IR tokenwire serves (int8 by default), one stream of the PEERS.md prompt at
temperature 0.7: the median time between decode steps of OpenVINO GenAI's ``ContinuousBatchingPipeline`` (as the
worker builds it), of its ``LLMPipeline`` (stateful, SDPA), and of a bare stateful infer request on the same IR
(the forward pass alone, no sampler), and with ``--llama-server`` llama.cpp's own decode time per token on the
GGUF file. Then the bare request's per-node counters (``PERF_COUNT``): time per kind of node, and the matrix
products' weight bytes read per step and the rate that makes.

    python bench/ov_step.py --rounds 5 --llama-server http://127.0.0.1:18555 --out bench/results/ov-step-cpu.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import statistics
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from peers import cpu_model
from tokenwire.engine import models
from tokenwire.engine.interface import ChatMessage, GenerationRequest, SamplingParams
from tokenwire.engine.openvino.engine import OVEngineConfig, worker_config
from tokenwire.engine.openvino.model import plan, prepare
from tokenwire.engine.openvino.worker import generation_config, load
from tokenwire.engine.prompt import PromptBuilder

PROMPT = "Write a long story about a dragon who learns to paint."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one stream's decode step on OpenVINO: pipeline, bare model, nodes")
    p.add_argument("--quantize", default="auto", help="the IR's weights: auto, none, int8, int4")
    p.add_argument("--ir", type=Path, default=None, help="run this IR folder instead (e.g. from bench/q4_1_ir.py)")
    p.add_argument(
        "--llama-server",
        default=None,
        help="a running llama-server's URL (http://127.0.0.1:PORT): its own decode time per token, in the same turns",
    )
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the results here (JSON; a .md beside it)")
    a = p.parse_args(argv)
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    found = plan(models.resolve(None))
    source = str(a.ir) if a.ir is not None else found.weights(a.quantize)
    prepared = prepare(found, 8192)
    request = GenerationRequest("x", SamplingParams(), messages=(ChatMessage("user", PROMPT),))
    prompt = PromptBuilder(prepared.tokenizer, prepared.max_context).build(request).token_ids
    tensor = ov.Tensor(np.array([prompt], dtype=np.int64))
    cfg = OVEngineConfig(max_batch_size=64, kv_cache_tokens=1 << 17, max_prefill_tokens=512)
    cb = load(worker_config(cfg, source, {}))
    llm = og.LLMPipeline(str(source), "CPU", ATTENTION_BACKEND="SDPA")
    xml = str(Path(source) / "openvino_model.xml")
    bare = ov.Core().compile_model(xml, "CPU").create_infer_request()
    profiled = ov.Core().compile_model(xml, "CPU", {"PERF_COUNT": "YES"}).create_infer_request()  # counters cost
    n = a.tokens

    def gen_config() -> Any:
        gc = generation_config(SamplingParams(max_tokens=n, temperature=0.7), n)
        gc.ignore_eos = True
        return gc

    def gaps(stamps: list[float]) -> float:
        return statistics.median(b - a for a, b in itertools.pairwise(stamps[5:])) * 1000

    def pipeline_step() -> float:
        handle = cb.add_request(random.getrandbits(62), tensor, gen_config())
        stamps = []
        while cb.has_non_finished_requests():
            cb.step()
            stamps.append(time.perf_counter())
            while handle.can_read():
                handle.read()
        return gaps(stamps)

    def llm_step() -> float:
        stamps: list[float] = []

        def streamer(_: str) -> Any:
            stamps.append(time.perf_counter())
            return og.StreamingStatus.RUNNING

        llm.generate(tensor, gen_config(), streamer)
        return gaps(stamps)

    def feed(ids: Any, start: int) -> dict[str, Any]:
        end = start + ids.shape[1]
        positions = np.arange(start, end, dtype=np.int64)[None]
        mask = np.ones((1, end), np.int64)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "beam_idx": np.zeros(1, np.int32)}

    def bare_step(req: Any = bare, steps: int = n) -> float:
        req.reset_state()
        req.infer(feed(np.array([prompt], np.int64), 0))
        stamps = []
        for i in range(steps):
            req.infer(feed(np.array([[123]], np.int64), len(prompt) + i))
            stamps.append(time.perf_counter())
        return gaps(stamps)

    def llama_step() -> float:
        """llama-server's decode time per token by its own timings (no HTTP), the same prompt and length."""
        text = prepared.tokenizer.decode(prompt)
        body = {"prompt": text, "n_predict": n, "temperature": 0.7, "ignore_eos": True, "cache_prompt": False}
        with urllib.request.urlopen(
            urllib.request.Request(
                a.llama_server.rstrip("/") + "/completion",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            ),
            timeout=120,
        ) as r:
            return float(json.load(r)["timings"]["predicted_per_token_ms"])

    steps = [("pipeline", pipeline_step), ("llm_pipeline", llm_step), ("bare", bare_step)]
    if a.llama_server:
        steps.append(("llama_server", llama_step))
    runs: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _, f in steps:
        f()  # warm-up
    for _ in range(a.rounds):
        for name, f in steps:
            runs[name].append(round(f(), 2))
    bare_step(profiled, 16)
    by_kind: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for info in profiled.profiling_info:  # its last step
        if info.status == info.Status.EXECUTED:
            by_kind[info.node_type] += info.real_time.total_seconds() * 1000
            count[info.node_type] += 1
    small = {ov.Type.u8, ov.Type.i8, ov.Type.u4, ov.Type.i4}  # the quantized weights (scales are not counted)
    weight_bytes = sum(
        int(op.get_byte_size())
        for op in ov.Core().read_model(xml).get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() in small
    )
    products = sum(v for k, v in by_kind.items() if k.startswith(("FullyConnected", "MatMul")))
    result: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "ir": str(source),
        "tokens": n,
        "step_ms": {k: {"runs": v, "median": statistics.median(v)} for k, v in runs.items()},
        "nodes_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "nodes": dict(count),
        "weight_mb_8bit_or_less": round(weight_bytes / 1e6, 1),
        "products_gb_per_s": round(weight_bytes / 1e6 / products, 1) if products else None,
    }
    lines = [
        f"One stream's decode step on OpenVINO ({Path(source).name}; {result['cpu'].get('name', '')}, "
        f"{result['date']}; medians of {n} steps, {a.rounds} rounds in turns)",
        "",
        "| what steps | ms per step, each round | median |",
        "|---|---|---:|",
        *(f"| {k} | {', '.join(map(str, v['runs']))} | {v['median']} |" for k, v in result["step_ms"].items()),
        "",
        "| node kind (bare model, one step, counters on) | nodes | ms |",
        "|---|---:|---:|",
        *(f"| {k} | {count[k]} | {v:.3f} |" for k, v in list(result["nodes_ms"].items())[:8]),
        "",
        f"Weights in 8 bits or fewer: {result['weight_mb_8bit_or_less']} MB, read once a step by the matrix "
        f"products in {products:.2f} ms: {result['products_gb_per_s']} GB/s.",
    ]
    save(a.out, result, lines)
    return 0


def save(out: Path | None, result: dict[str, Any], lines: list[str]) -> None:
    """Print the table ``lines``; with ``out``, write ``result`` there (JSON) and the table beside it (.md)."""
    print("\n".join(lines))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
