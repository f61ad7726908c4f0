"""Which engine serves each model family, and how fast: a random Hugging Face folder per family, served as a user
would (``tokenwire serve --model DIR``, engine auto), 64-token greedy completions over HTTP (SSE).

Each folder has the family's real configuration at a small size (4 layers, hidden 256, 4 heads, 2 KV heads,
intermediate 768) and the default model's tokenizer (its vocabulary: 49,152 tokens), so that steps cost what the
layer shapes cost and nothing is downloaded. ``--engines auto,transformers`` serves each folder both ways, side by
side in one run, for the ratio. Prints a Markdown table (engine chosen, aggregate tok/s per stream count) and
writes JSON.

    python bench/families.py --families llama,qwen2,qwen3,mistral,gemma2,gemma3,phi3 --streams 1,8
    python bench/families.py --families gemma2,gemma2-2b --tokenizer sentencepiece --engines auto,transformers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import loadgen
from compare import BENCH, free_port, start, stop, wait_ready

SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {  # name -> (model class, config class, its own settings)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "llama3.1": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
    ),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 64}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "mistral-v0.1": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 1024}),  # a window, as v0.1's
    "gemma2": (  # the attention scaled by 1/sqrt(head size), as every release (and llama.cpp's gemma2 graph) does
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 1024},
    ),
    "gemma3": (  # five local layers to a global one in the real models: three to one here
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {"head_dim": 64, "sliding_window": 1024, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    ),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"sliding_window": 1024}),  # a window, as Phi-3-mini-4k's
    "gemma2-2b": (  # Gemma 2 2B's whole shape, its 256,000-token vocabulary included (the tokenizer uses the first)
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "max_position_embeddings": 8192,
            "vocab_size": 256000,
        },
    ),
    "gemma3-1b": (  # Gemma 3 1B's whole shape, its 262,144-token vocabulary included (the tokenizer uses the first)
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 512,
            "max_position_embeddings": 32768,
            "vocab_size": 262144,
        },
    ),
}


def build(family: str, tokenizer: Path, target: Path) -> Path:
    """A random folder of ``family`` with ``tokenizer``'s files."""
    import torch
    import transformers

    model_class, config_class, own = FAMILIES[family]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    ids = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    ids["pad_token_id"] = tok.pad_token_id
    config = getattr(transformers, config_class)(**{**ids, **SHAPE, **own})  # a family's own settings win
    model = getattr(transformers, model_class)(config).to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for path in tokenizer.iterdir():
        if path.is_file() and not path.name.startswith(("config", "model")):
            shutil.copy(path, target / path.name)
    return target


def default_tokenizer() -> Path:
    from tokenwire.engine import models
    from tokenwire.engine.openvino.model import tokenizer_folder

    return tokenizer_folder(models.default_model_path())


def sentencepiece_tokenizer(target: Path) -> Path:
    """A small SentencePiece tokenizer (tokenizer.model and its tokenizer.json) as Gemma's releases ship theirs: what
    llama.cpp's own layout of a Gemma 2 folder is written with (tests/tiny.py's)."""
    sys.path.insert(0, str(BENCH.parent))
    from tests.tiny import save_sentencepiece_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    save_sentencepiece_tokenizer(target, "GemmaTokenizer").save_pretrained(target)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--engines", default="auto", help="comma-separated --engine values to serve each folder with")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--tokenizer",
        choices=("default", "sentencepiece"),
        default="default",
        help="the default model's byte-level one, or a small SentencePiece one (Gemma 2 to llama.cpp needs it)",
    )
    p.add_argument("--out", default=str(BENCH / "results" / "families-cpu.json"))
    a = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = default_tokenizer() if a.tokenizer == "default" else sentencepiece_tokenizer(Path(tmp) / "spm")
        for family in a.families.split(","):
            folder = build(family, tokenizer, Path(tmp) / family)
            for engine in a.engines.split(","):
                rows.append(serve_and_measure(family, folder, engine, a, env, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    streams = [int(s) for s in a.streams.split(",")]
    table = [
        "| family | --engine | engine that ran | " + " | ".join(f"{n} stream(s) tok/s" for n in streams) + " |",
        "|---|---|---|" + "---:|" * len(streams),
    ]
    for r in rows:
        figures = " | ".join(f"{r['tok_s'].get(str(n), 0):.1f}" for n in streams) if r["tok_s"] else "—"
        table.append(f"| {r['family']} | {r['engine']} | {r['ran'] or 'did not start: ' + r['error']} | {figures} |")
    text = "\n".join(table)
    print(text)
    out = Path(a.out)
    out.write_text(json.dumps({"rows": rows, "shape": SHAPE, "max_tokens": a.max_tokens}, indent=1))
    argv = f"--families {a.families} --streams {a.streams} --engines {a.engines} --tokenizer {a.tokenizer}"
    out.with_suffix(".md").write_text(f"bench/families.py {argv}\n\n{text}\n")


def serve_and_measure(
    family: str, folder: Path, engine: str, a: argparse.Namespace, env: dict[str, str], tmp: Path
) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "tokenwire.cli", "serve", "--port", str(port), "--model", str(folder)]
    argv += ["--engine", engine, "--heartbeat-interval", "0"]
    log = tmp / f"{family}-{engine}.log"
    row: dict[str, Any] = {"family": family, "engine": engine, "ran": None, "error": "", "tok_s": {}}
    proc = start(argv, log, env)
    try:
        try:
            wait_ready(proc, port, True, log)
        except Exception:
            row["error"] = (log.read_text().strip().splitlines() or ["?"])[-1][-200:]
            return row
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=30) as r:
            row["ran"] = json.loads(r.read())["engine"]["backend"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            model = json.loads(r.read())["data"][0]["id"]
        for n in [int(s) for s in a.streams.split(",")]:
            cfg, _ = loadgen.parse_args(
                ["--url", f"http://127.0.0.1:{port}", "--mode", "openai", "--model", model, "--streams", str(n),
                 "--max-tokens", str(a.max_tokens), "--temperature", "0", "--prompt", "Tell me a story."]
            )  # fmt: skip
            summary = asyncio.run(loadgen.run_load(cfg))
            row["tok_s"][str(n)] = summary["tokens_per_s"]
            row.setdefault("errors", 0)
            row["errors"] += summary["errors"]
    finally:
        stop(proc)
    return row


if __name__ == "__main__":
    main()
