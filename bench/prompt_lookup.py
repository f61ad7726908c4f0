"""Prompt-lookup speculative decoding on OpenVINO GenAI's pipeline, in process: what it buys, side by side.

The pipeline offers it as a mode of the whole pipeline (``prompt_lookup`` at construction; each request must then
give ``num_assistant_tokens`` >= 1 and ``max_ngram_size``): each step proposes the tokens that followed the last
n-gram's earlier occurrence in the prompt or the output, and verifies them in one forward pass. This measures,
in one run, the default model (GGUF as stored), the chat prompt of PEERS.md, all streams at once:
aggregate tokens/s and steps per run, with and without it, greedy and sampled (temperature 0.7).

    python bench/prompt_lookup.py --streams 1,32 --max-tokens 128 --runs 3 --out bench/results/prompt-lookup-cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from peers import cpu_model
from tokenwire.engine import models
from tokenwire.engine.openvino.engine import BLOCK_TOKENS, OVEngineConfig, worker_config
from tokenwire.engine.openvino.worker import load

PROMPT = "Write a long story about a dragon who learns to paint."


def pipeline(gguf: str, lookup: bool) -> Any:
    """The pipeline as tokenwire's worker builds it (2,048 KV blocks, 64 sequences, 512 tokens a step, prefix
    caching), in prompt-lookup mode or not."""
    cfg = OVEngineConfig(kv_cache_tokens=2048 * BLOCK_TOKENS, max_batch_size=64, max_prefill_tokens=512)
    return load(worker_config(cfg, gguf, {"prompt_lookup": True} if lookup else None))


def config(max_tokens: int, temperature: float, assistant_tokens: int) -> Any:
    import openvino_genai as og

    gc = og.GenerationConfig()
    gc.max_new_tokens = max_tokens
    gc.ignore_eos = True
    if temperature == 0:
        gc.do_sample = False
    else:
        gc.do_sample = True
        gc.temperature = temperature
        gc.rng_seed = random.getrandbits(62)
    if assistant_tokens:
        gc.num_assistant_tokens = assistant_tokens
        gc.max_ngram_size = 3
    return gc


def run(
    pipe: Any, ids: Any, streams: int, max_tokens: int, temperature: float, assistant_tokens: int
) -> dict[str, Any]:
    handles = [
        pipe.add_request(random.getrandbits(40), ids, config(max_tokens, temperature, assistant_tokens))
        for _ in range(streams)
    ]
    tokens, steps, start = 0, 0, time.perf_counter()
    while pipe.has_non_finished_requests() and steps < 100_000:
        pipe.step()
        steps += 1
        for h in handles:
            while h.can_read():
                tokens += sum(len(out.generated_ids) for out in h.read().values())
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "steps": steps, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="prompt-lookup speculative decoding on OpenVINO GenAI, in process")
    p.add_argument("--streams", default="1,32")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--assistant-tokens", type=int, default=4, help="tokens proposed per step")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    resolved = models.resolve(None)
    gguf = str(Path(resolved.path) / str(resolved.gguf_file))
    pipes = {False: pipeline(gguf, False), True: pipeline(gguf, True)}
    tok = pipes[False].get_tokenizer()
    chat = [{"role": "user", "content": PROMPT}]
    ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True)).input_ids
    rows: list[dict[str, Any]] = []
    for streams in [int(s) for s in a.streams.split(",")]:
        for temperature in (0.0, 0.7):
            for lookup in (False, True):  # a warm-up each, then the runs, the two modes in turns
                run(pipes[lookup], ids, streams, 8, temperature, a.assistant_tokens if lookup else 0)
            runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for _ in range(a.runs):
                for lookup in (False, True):
                    k = a.assistant_tokens if lookup else 0
                    runs[lookup].append(run(pipes[lookup], ids, streams, a.max_tokens, temperature, k))
            for lookup in (False, True):
                tps = statistics.median(r["tokens_per_s"] for r in runs[lookup])
                row = {"streams": streams, "temperature": temperature, "prompt_lookup": lookup}
                row |= {"tokens_per_s": round(tps, 1), "steps": [r["steps"] for r in runs[lookup]]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "| streams | temperature | tok/s without | tok/s with prompt lookup | ratio | steps without / with |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for off, on in zip(rows[::2], rows[1::2], strict=True):
        lines.append(
            f"| {off['streams']} | {off['temperature']} | {off['tokens_per_s']} | {on['tokens_per_s']} "
            f"| {on['tokens_per_s'] / off['tokens_per_s']:.2f} | {off['steps']} / {on['steps']} |"
        )
    table = "\n".join(lines)
    print(table)
    if a.out:
        out = Path(a.out)
        meta = {"date": datetime.now().isoformat(timespec="seconds"), "args": vars(a), "gguf": gguf, "cpu": cpu_model()}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
