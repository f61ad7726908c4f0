"""Would the default model's own first layers make a draft for speculative decoding? Their acceptance, measured.

Draft-model speculative decoding needs a cheaper model of the same vocabulary, and SmolLM2-135M is the smallest of
its family. The one draft it has is itself cut short: the first L of its 30 layers, its final norm and its output
layer (an early exit). Sampled speculative decoding accepts a proposed token with probability
``sum_x min(p(x), q(x))`` on average, ``p`` the full model's distribution and ``q`` the draft's, both at the
benchmark's temperature. This generates answers with the full model (transformers, float32, the weights tokenwire
converts the GGUF file to) and computes that acceptance at every position for each L.

    python bench/self_draft.py --out bench/results/self-draft-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from ov_step import save
from peers import converted_folder, cpu_model

PROMPTS = (
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works.",
    "What is the capital of France? Tell me about its history.",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="acceptance of the default model's early exits as its own draft")
    p.add_argument("--layers", default="4,8,12,16,20,24,27", help="draft depths L to measure")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results here (JSON; a .md beside it)")
    a = p.parse_args(argv)
    import torch
    import transformers

    torch.manual_seed(a.seed)
    folder = converted_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    depths = [int(x) for x in a.layers.split(",")]
    per_depth: dict[int, list[float]] = {d: [] for d in depths}
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        enc = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = torch.tensor([list(enc["input_ids"])])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=a.max_tokens, do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0
            )
            full = model(out, output_hidden_states=True)
        start = ids.shape[1] - 1  # the positions that predicted the generated tokens
        p_full = torch.softmax(full.logits[0, start:-1] / a.temperature, -1)
        for d in depths:
            with torch.no_grad():
                hidden = model.model.norm(full.hidden_states[d][0, start:-1])
                q = torch.softmax(model.lm_head(hidden) / a.temperature, -1)
            per_depth[d].append(float(torch.minimum(p_full, q).sum(-1).mean()))
    layers = int(model.config.num_hidden_layers)
    rows = [
        {"layers": d, "of": layers, "acceptance": round(statistics.mean(v), 3), "per_prompt": [round(x, 3) for x in v]}
        for d, v in per_depth.items()
    ]
    result: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "temperature": a.temperature,
        "max_tokens": a.max_tokens,
        "rows": rows,
    }
    lines = [
        f"Early exits of the default model as its own draft (temperature {a.temperature}, {a.max_tokens} tokens, "
        f"{len(PROMPTS)} prompts; {result['cpu'].get('name', '')}, {result['date']})",
        "",
        "| draft layers | mean acceptance per proposed token | per prompt |",
        "|---:|---:|---|",
        *(f"| {r['layers']} of {layers} | {r['acceptance']} | {', '.join(map(str, r['per_prompt']))} |" for r in rows),
    ]
    save(a.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
