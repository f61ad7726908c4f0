"""In-process engine comparison on one model, same prompts, one run: which engine core to build on.

Compares, at each concurrency N (greedy, max_new_tokens fixed):
  - tokenwire's HFEngine (own scheduler + slot KV cache over the transformers model),
  - transformers' continuous batching (``model.generate_batch``, paged KV cache),
  - plain ``model.generate`` with its KV cache, one request at a time (N=1 only).
Prints aggregate generated tokens/s per engine and the ratios. Usage:

    HF_HUB_OFFLINE=1 python bench/engine_compare.py --streams 1,32 --max-tokens 64 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

import torch

PROMPT = "Write a long story about a dragon who learns to paint."


def chat_ids(tok: Any, n: int) -> list[list[int]]:
    # distinct prompts so that no engine can share work between requests
    return [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": f"{PROMPT} (version {i})"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for i in range(n)
    ]


def bench_tokenwire(n: int, max_tokens: int, model: str | None, device: str) -> float:
    from tokenwire.engine import GenerationRequest, OutputKind, SamplingParams
    from tokenwire.engine.hf.engine import HFEngine, HFEngineConfig

    async def main() -> float:
        eng = HFEngine(HFEngineConfig(model=model, device=device, dtype="float32" if device == "cpu" else "bfloat16"))
        await eng.start()

        async def one(i: int) -> int:
            req = GenerationRequest(
                f"r{i}", SamplingParams(max_tokens=max_tokens, temperature=0), prompt=f"{PROMPT} (version {i})"
            )
            async for out in eng.generate(req):
                if out.kind is OutputKind.FINISHED:
                    return out.completion_tokens
            return 0

        await one(-1)  # warm-up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(i) for i in range(n)])
        dt = time.perf_counter() - t0
        await eng.shutdown()
        return sum(counts) / dt

    return asyncio.run(main())


def load_plain(model: str | None, device: str) -> tuple[Any, Any]:
    from tokenwire.engine import models
    from tokenwire.engine.hf import loader

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return loader.load(models.resolve(model), device, dtype)


def bench_transformers_cb(model: Any, tok: Any, n: int, max_tokens: int) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    model.generate_batch(chat_ids(tok, 1), generation_config=gen)  # warm-up
    inputs = chat_ids(tok, n)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs, generation_config=gen)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return tokens / dt


def bench_plain_generate(model: Any, tok: Any, max_tokens: int) -> float:
    ids = torch.tensor(chat_ids(tok, 1), device=model.device)
    mask = torch.ones_like(ids)
    kw = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
    model.generate(ids, attention_mask=mask, **kw)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **kw)
    dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    streams = [int(s) for s in args.streams.split(",")]
    results: list[dict[str, Any]] = []
    model, tok = load_plain(args.model, args.device)
    for n in streams:
        row: dict[str, Any] = {"streams": n}
        row["tokenwire"] = bench_tokenwire(n, args.max_tokens, args.model, args.device)
        row["transformers_cb"] = bench_transformers_cb(model, tok, n, args.max_tokens)
        if n == 1:
            row["plain_generate"] = bench_plain_generate(model, tok, args.max_tokens)
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| streams | tokenwire tok/s | transformers CB tok/s | plain generate tok/s | tokenwire / CB |")
    print("|---|---|---|---|---|")
    for r in results:
        plain = f"{r['plain_generate']:.1f}" if "plain_generate" in r else "-"
        ratio = r["tokenwire"] / r["transformers_cb"]
        print(f"| {r['streams']} | {r['tokenwire']:.1f} | {r['transformers_cb']:.1f} | {plain} | {ratio:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"max_tokens": args.max_tokens, "results": results, "torch_threads": torch.get_num_threads()},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
