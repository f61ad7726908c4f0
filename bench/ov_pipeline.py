"""OpenVINO GenAI's continuous-batching pipeline in process, no server: the ceiling for tokenwire's OpenVINO engine.

The same pipeline settings (engine.worker_config) and sampling mapping as tokenwire's worker, the
same chat prompt tokens (tokenwire's tokenizer); all streams are added at once and stepped until done. Prints
one JSON summary per run in bench/loadgen.py's shape (tokens/s over the wall time, TTFT, inter-token latency),
so bench/peers.py can put it in its tables.

    python bench/ov_pipeline.py --streams 32 --max-tokens 64 [--model FILE.gguf] [--quantize int4] [--runs 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.interface import ChatMessage, GenerationRequest, SamplingParams
from tokenwire.engine.openvino.engine import OVEngineConfig, worker_config
from tokenwire.engine.openvino.model import plan, prepare
from tokenwire.engine.openvino.worker import generation_config, load
from tokenwire.engine.prompt import PromptBuilder

DEFAULT_PROMPT = "Write a long story about a dragon who learns to paint."


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    s = sorted(values)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return {"p50": round(statistics.median(s) * 1000, 2), "p99": round(p99 * 1000, 2)}


def run_once(pipe: Any, ids: list[int], streams: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    import numpy as np
    import openvino as ov

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    tensor = ov.Tensor(np.array([ids], dtype=np.int64))
    start = time.perf_counter()
    handles = {}
    for k in range(streams):  # a config each: each draws its own seed, as in the server
        handles[k] = pipe.add_request(random.getrandbits(62), tensor, generation_config(params, max_tokens))
    times: dict[int, list[float]] = {k: [] for k in handles}
    steps = 0
    while pipe.has_non_finished_requests() and steps < 100_000:
        pipe.step()
        steps += 1
        now = time.perf_counter()
        for k, h in handles.items():
            while h.can_read():
                for out in h.read().values():
                    times[k].extend([now] * len(out.generated_ids))
    end = time.perf_counter()
    tokens = sum(len(t) for t in times.values())
    itl = [b - a for t in times.values() for a, b in itertools.pairwise(t)]
    return {
        "mode": "in-process",
        "streams": streams,
        "max_tokens": max_tokens,
        "tokens": tokens,
        "wall_s": round(end - start, 3),
        "tokens_per_s": round(tokens / (end - start), 2),
        "ttft_ms": _ms([t[0] - start for t in times.values() if t]),
        "itl_ms": _ms(itl),
        "errors": sum(1 for t in times.values() if not t),
        "timed_out": False,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default=None, help="a .gguf file or OpenVINO IR folder (default: the default model)")
    p.add_argument("--quantize", default="auto", help="weights of the IR made from a GGUF file: auto, none, int8, int4")
    p.add_argument("--ir", default=None, help="run this IR folder instead (prompt tokens still from --model)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--runs", type=int, default=1, help="runs after a warm-up, one JSON line each")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--kv-cache-tokens", type=int, default=1 << 17)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--property", action="append", default=[], help="an OpenVINO compile property, KEY=VALUE")
    a = p.parse_args(argv)
    properties: dict[str, str | int] = dict(kv.split("=", 1) for kv in a.property)
    found = plan(models.resolve(a.model))
    source = a.ir or found.weights(a.quantize)
    prepared = prepare(found, 8192)
    prompt = PromptBuilder(prepared.tokenizer, prepared.max_context).build(
        GenerationRequest("x", SamplingParams(), messages=(ChatMessage("user", a.prompt),))
    )
    settings = OVEngineConfig(
        max_batch_size=a.max_batch_size, kv_cache_tokens=a.kv_cache_tokens, max_prefill_tokens=a.max_prefill_tokens
    )
    pipe = load(worker_config(settings, source, properties))
    run_once(pipe, prompt.token_ids, 1, 4, a.temperature)  # warm-up
    for _ in range(a.runs):
        print(json.dumps(run_once(pipe, prompt.token_ids, a.streams, a.max_tokens, a.temperature)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
