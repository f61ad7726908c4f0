"""Where a step of the llamacpp engine goes: llama.cpp's decode against tokenwire's sampling of its logits, and
against llama.cpp's own sampler chain on the same logits, per batch size.

For each batch size B: B sequences decode one token each (``llama_decode`` over one batch), then their B rows of
logits are sampled three ways: tokenwire's sampler (engine/hf/sampler.py, as the engine runs it: the rows copied
out of llama.cpp, temperature, top-p, top-k and a repetition penalty), tokenwire's greedy path, and llama.cpp's
sampler chain (penalties, top-k, top-p, temperature, a seeded draw) over the same rows inside llama.cpp. Median
milliseconds of ``--steps`` steps.

    python bench/llamacpp_step.py --batches 1,8,32 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()

    import llama_cpp
    import torch

    from tokenwire.engine import models
    from tokenwire.engine.hf.sampler import RowSampler
    from tokenwire.engine.interface import SamplingParams
    from tokenwire.engine.llamacpp.context import Entry, LlamaContext

    gguf = Path(a.model) if a.model else models.default_model_path()
    batches = [int(b) for b in a.batches.split(",")]
    llama = LlamaContext(gguf, 8192, max(64, 3 * max(batches)), max(batches) + 1, 2)
    lib = llama.lib
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1)
    greedy = SamplingParams(temperature=0.0)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(llama.n_vocab, 64, 1.1, 0.0, 0.0))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(40))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(0.9, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(0.8))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(7))
    print("| batch | llama_decode ms | tokenwire sampling ms | tokenwire greedy ms | llama.cpp sampler chain ms |")
    print("|---:|---:|---:|---:|---:|")
    for b in batches:
        sampler = RowSampler(torch.device("cpu"))
        ids = [f"r{i}" for i in range(b)]
        for rid in ids:
            sampler.add(rid, 7)
        prompts = [[1, 2, 3 + i] for i in range(b)]
        for s in range(b):
            llama.trim(s, 0)
        llama.decode([Entry(t, p, s, p == 2) for s in range(b) for p, t in enumerate(prompts[s])])
        times: dict[str, list[float]] = {"decode": [], "ours": [], "greedy": [], "chain": []}
        for step in range(a.steps):
            entries = [Entry(100 + s, 3 + step, s, True) for s in range(b)]
            t0 = time.perf_counter()
            logits = llama.decode(entries)
            t1 = time.perf_counter()
            rows = torch.from_numpy(logits)
            sampler.sample(rows, ids, [sampled] * b, prompts, [[] for _ in range(b)])
            t2 = time.perf_counter()
            sampler.sample(rows.clone(), ids, [greedy] * b, prompts, [[] for _ in range(b)])
            t3 = time.perf_counter()
            for i in range(b):
                lib.llama_sampler_sample(chain, llama.ctx, i)
            t4 = time.perf_counter()
            for key, took in (("decode", t1 - t0), ("ours", t2 - t1), ("greedy", t3 - t2), ("chain", t4 - t3)):
                times[key].append(took * 1000)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {b} | {m['decode']:.1f} | {m['ours']:.2f} | {m['greedy']:.2f} | {m['chain']:.2f} |", flush=True)
    lib.llama_sampler_free(chain)
    llama.close()
    del llama_cpp


if __name__ == "__main__":
    main()
