"""The speed at a real size: random weights in TinyLlama-1.1B's shape, served three ways side by side in one run.

A decode step costs what the layer shapes cost, whatever the weights hold, so random weights stand for the real
model (its vocabulary aside: the folder carries the default model's tokenizer, 49,152 tokens, where TinyLlama has
32,000). From one random Hugging Face folder (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632):

- llama.cpp's converter writes it as a float16 GGUF and ``llama-quantize`` makes the Q4_K_M file users download;
- ``tokenwire serve --model FOLDER`` (the default: int8 weights on OpenVINO);
- ``tokenwire serve --model Q4_K_M.gguf`` (its first start timed, its peak memory sampled: the process and its
  children);
- ``llama-server -m Q4_K_M.gguf --parallel 32 -c 16384 -t 2``;
- with ``--int4``, also ``tokenwire serve --model FOLDER --quantize int4``;
- with ``--gemma3``, Gemma 3 1B's shape (and vocabulary) instead, llama.cpp's gemma3 file of it; with ``--phi3``,
  Phi-3-mini's (3.8B, its window and vocabulary), llama.cpp's phi3 file of it (llama-server then holds 8,192
  tokens: 256 a stream, where 16,384 would take 6 GiB);
- with ``--llamacpp``, also ``tokenwire serve --engine llamacpp --model Q4_K_M.gguf`` (llama.cpp's kernels under
  tokenwire's scheduler); ``--no-folder`` leaves the folder out.

All stay up, idle between loads; each stream count runs against each server in turn, the order reversed every
round. OpenAI SSE, greedy, ``--max-tokens`` tokens, aggregate tok/s and TTFT. See ../shared/PEERS.md for building
llama.cpp (``--llama-cpp`` is its source folder, with ``build/bin``).

    python bench/model_size.py --llama-cpp /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --streams 1,8,32 --rounds 1

Prints a Markdown table and writes ``--out`` (JSON) and ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import loadgen
from compare import BENCH, free_port, start, stop, wait_ready
from families import FAMILIES

TINYLLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


# Gemma 3 1B's shape and its 262,144-token vocabulary (bench/families.py); here with a SentencePiece tokenizer trained
# on little text (llama.cpp's converter pads the vocabulary with [PAD] pieces to the model's size)
GEMMA3_1B = FAMILIES["gemma3-1b"][2]


# Phi-3-mini's shape (3.8B: 32 layers of hidden 3072, 32 heads, no grouped KV, its window of 2047, its 32,064-token
# vocabulary), as llama.cpp writes it (architecture phi3: fused query-key-value and gate-up matrices)
PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32064,
    "tie_word_embeddings": False,
}


def build_sentencepiece_folder(target: Path, family: str) -> Path:
    """Random weights in Gemma 3 1B's (``gemma3``) or Phi-3-mini's (``phi3``) shape, with a SentencePiece tokenizer
    (llama.cpp's converter needs one; it pads the vocabulary with [PAD] pieces to the model's size)."""
    import torch
    import transformers

    sys.path.insert(0, str(BENCH.parent))
    from tests.tiny import save_sentencepiece_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    names = {"gemma3": ("GemmaTokenizer", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_1B)}
    names["phi3"] = ("LlamaTokenizer", "Phi3Config", "Phi3ForCausalLM", PHI3_MINI)
    kind, config_class, model_class, shape = names[family]
    tok = save_sentencepiece_tokenizer(target, kind)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    config = getattr(transformers, config_class)(**ids, **shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: Phi-3-mini's 3.8B in float32 would take 15 GB
    try:
        getattr(transformers, model_class)(config).save_pretrained(target)
    finally:
        torch.set_default_dtype(torch.float32)
    tok.save_pretrained(target)
    return target


def build_folder(tokenizer: Path, target: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **TINYLLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for path in tokenizer.iterdir():
        if path.is_file() and not path.name.startswith(("config", "model", "tokenwire")):
            shutil.copy(path, target / path.name)
    return target


def q4_k_m(folder: Path, llama_cpp: Path, work: Path) -> Path:
    """llama.cpp's converter (float16), then its quantizer: the file type users download."""
    f16, out = work / "model-f16.gguf", work / "model-Q4_K_M.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    convert = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16"]
    subprocess.run([*convert, "--outfile", str(f16)], check=True, env=env, capture_output=True)
    quantize = [str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f16), str(out), "Q4_K_M"]
    subprocess.run(quantize, check=True, capture_output=True)
    f16.unlink()
    return out


class PeakMemory:
    """Samples the resident memory of a process and its children (every 0.2 s) until stopped; the peak in GiB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._done.wait(0.2)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak / 2**30


def served_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        return str(json.loads(r.read())["data"][0]["id"])


def measure(port: int, streams: int, max_tokens: int) -> dict[str, Any]:
    cfg, _ = loadgen.parse_args(
        ["--url", f"http://127.0.0.1:{port}", "--mode", "openai", "--model", served_model(port),
         "--streams", str(streams), "--max-tokens", str(max_tokens), "--temperature", "0",
         "--prompt", "Tell me a story about a lighthouse keeper."]
    )  # fmt: skip
    summary: dict[str, Any] = asyncio.run(loadgen.run_load(cfg))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp's source folder, built (build/bin)")
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--int4", action="store_true", help="add the folder served with --quantize int4")
    p.add_argument("--llamacpp", action="store_true", help="add the Q4_K_M file served with --engine llamacpp")
    p.add_argument("--no-folder", action="store_true", help="leave out the folder served by the default engine")
    p.add_argument("--gemma3", action="store_true", help="Gemma 3 1B's shape instead of TinyLlama's")
    p.add_argument("--phi3", action="store_true", help="Phi-3-mini's shape (3.8B) instead of TinyLlama's")
    p.add_argument("--out", default=str(BENCH / "results" / "model-size-cpu.json"))
    a = p.parse_args()
    sys.path.insert(0, str(BENCH))
    from families import default_tokenizer

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="model-size-") as tmp:
        work = Path(tmp)
        cache = work / "cache"  # a cache of its own: the first start on the GGUF is a real first start
        env["TOKENWIRE_CACHE_DIR"] = str(cache)
        if a.gemma3 or a.phi3:
            folder = build_sentencepiece_folder(work / "random", "gemma3" if a.gemma3 else "phi3")
        else:
            folder = build_folder(default_tokenizer(), work / "tinyllama-random")
        gguf = q4_k_m(folder, a.llama_cpp, work)
        sizes = {"folder_gb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9}
        sizes["q4_k_m_gb"] = gguf.stat().st_size / 1e9
        tw = [sys.executable, "-m", "tokenwire.cli", "serve", "--heartbeat-interval", "0"]
        llama = [str(a.llama_cpp / "build" / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1"]
        llama += ["-t", "2", "--parallel", "32", "-c", "8192" if a.phi3 else "16384", "--no-webui"]
        servers = {
            "tokenwire, the Hugging Face folder (int8)": [*tw, "--model", str(folder)],
            "tokenwire, the Q4_K_M file": [*tw, "--model", str(gguf)],
            "llama-server, the Q4_K_M file": llama,
        }
        if a.no_folder:
            del servers["tokenwire, the Hugging Face folder (int8)"]
        if a.llamacpp:
            servers["tokenwire --engine llamacpp, the Q4_K_M file"] = [
                *tw,
                "--engine",
                "llamacpp",
                "--model",
                str(gguf),
            ]
        if a.int4:
            servers["tokenwire, the Hugging Face folder, --quantize int4"] = [
                *tw,
                "--model",
                str(folder),
                "--quantize",
                "int4",
            ]
        procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        starts: dict[str, dict[str, float]] = {}
        results: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in servers}
        try:
            for name, argv in servers.items():  # one at a time: each start alone on the machine
                port = free_port()
                argv = [*argv, "--port", str(port)]
                log = work / f"{len(procs)}.log"
                t0 = time.monotonic()
                proc = start(argv, log, env)
                procs[name] = (proc, port)
                peak = PeakMemory(proc.pid)
                try:
                    wait_ready(proc, port, "tokenwire" in name, log)  # llama-server: its port open (no /ready)
                finally:
                    starts[name] = {"ready_s": round(time.monotonic() - t0, 1), "peak_gib": round(peak.stop(), 2)}
                print(f"{name}: ready in {starts[name]['ready_s']} s, peak {starts[name]['peak_gib']} GiB", flush=True)
            order = list(servers)
            for round_ in range(a.rounds):
                for n in [int(s) for s in a.streams.split(",")]:
                    for name in order if round_ % 2 == 0 else order[::-1]:
                        summary = measure(procs[name][1], n, a.max_tokens)
                        results[name].setdefault(str(n), []).append(summary)
                        print(f"{name} @ {n}: {loadgen.format_summary(summary)}", flush=True)
        finally:
            for proc, _ in procs.values():
                stop(proc)
    write(a, sizes, starts, results)


def write(a: argparse.Namespace, sizes: dict[str, float], starts: dict[str, Any], results: dict[str, Any]) -> None:
    import statistics

    streams = a.streams.split(",")
    reference = "llama-server, the Q4_K_M file"

    def tok_s(name: str, n: str) -> float:
        return statistics.median(s["tokens_per_s"] for s in results[name].get(n, [])) if results[name].get(n) else 0

    def ttft(name: str, n: str, q: str = "p50") -> float:
        return statistics.median(s["ttft_ms"][q] or 0 for s in results[name].get(n, [])) / 1000

    head = " | ".join(f"{n} stream(s) tok/s (× llama-server) | TTFT p50 / p99 s" for n in streams)
    lines = [f"| server | first start s | peak GiB | {head} |", "|---|---:|---:|" + "---:|---:|" * len(streams)]
    for name in results:
        cells = []
        for n in streams:
            ratio = tok_s(name, n) / tok_s(reference, n) if tok_s(reference, n) else 0
            cells.append(f"{tok_s(name, n):.1f} ({ratio:.2f}×) | {ttft(name, n):.2f} / {ttft(name, n, 'p99'):.2f}")
        start_ = starts.get(name, {})
        lines.append(f"| {name} | {start_.get('ready_s', '—')} | {start_.get('peak_gib', '—')} | {' | '.join(cells)} |")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    meta = {
        "shape": GEMMA3_1B if a.gemma3 else PHI3_MINI if a.phi3 else TINYLLAMA,
        "sizes": sizes,
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
    }
    out.write_text(json.dumps({**meta, "starts": starts, "results": results}, indent=1))
    header = f"bench/model_size.py --streams {a.streams} --rounds {a.rounds} --max-tokens {a.max_tokens}\n"
    sizes_line = f"\nsafetensors (bfloat16) {sizes['folder_gb']:.2f} GB, Q4_K_M {sizes['q4_k_m_gb']:.2f} GB\n\n"
    out.with_suffix(".md").write_text(header + sizes_line + text + "\n")


if __name__ == "__main__":
    main()
