"""A model folder with a known architecture and random weights, for speed measurements where the real weights
cannot travel (the GPU machine takes 64 MiB of files; the default model is 94 MiB as GGUF, more converted).

A decode step costs the same whatever the weights hold, so tokens/s measured on random weights stands for the
real model's. The answers are noise, and end only at max_tokens (an end-of-sequence token is one in ~50,000).

    python bench/random_model.py --arch smollm2-135m --tokenizer TOKENIZER_FOLDER --out /tmp/m135 --device cuda

``--tokenizer`` is a folder with the model family's tokenizer files (tokenizer.json, tokenizer_config.json,
chat_template.jinja), copied into the result; tokenwire keeps the default model's next to its converted copy
(``~/.cache/tokenwire/SmolLM2-135M-Instruct.Q4_1-*-tokenizer``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

# SmolLM2's architectures (the Llama layout, its 49,152-token vocabulary, tied embeddings)
COMMON: dict[str, Any] = {
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-5,
}
ARCHS: dict[str, dict[str, Any]] = {
    # the default model, SmolLM2-135M-Instruct
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
    },
    # SmolLM2-1.7B-Instruct
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
    },
}


def build(arch: str, tokenizer: Path, out: Path, device: str, dtype: str) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**COMMON, **ARCHS[arch])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a model folder with random weights and a known architecture")
    p.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    p.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json and tokenizer_config.json")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: much faster for big ones)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    a = p.parse_args(argv)
    if not (Path(a.tokenizer) / "tokenizer.json").is_file():
        p.error(f"--tokenizer {a.tokenizer}: no tokenizer.json there")
    print(build(a.arch, Path(a.tokenizer), Path(a.out), a.device, a.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
