"""Weight formats for the OpenVINO engine: tokens/s and perplexity of each, side by side in one run.

For each ``--quantize`` format the model is made into OpenVINO IR (engine/openvino/ir.py, cached); ``stored`` is
the GGUF file as OpenVINO GenAI reads it by itself (what tokenwire ran before ir.py). Each is measured in one
run: tokens/s of OpenVINO's pipeline in process (bench/ov_pipeline.py: the engine's ceiling) at each stream
count, and perplexity on a fixed text (the project's seed tutorial) computed by OpenVINO from that IR, so the
error counted is the one the engine serves, kernels included. ``file`` is transformers' perplexity from the
GGUF file itself (it decodes the blocks exactly): what the weights are worth.

    python bench/formats.py [--model FILE.gguf|HF_FOLDER] --streams 1,32 --out bench/results/formats-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TEXT = BENCH.parent.parent / "shared" / "seed" / "000_15d103f118269f62.txt"


def file_perplexity(gguf: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.inference_mode():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    return math.exp(float(loss))


def ir_perplexity(folder: Path, ids: list[int]) -> float:
    """Perplexity of ``ids`` by the IR in ``folder``, one forward pass, with the engine's compile settings."""
    import numpy as np

    from tokenwire.engine.openvino import ir

    n = len(ids)
    logits = ir.logits(folder, ids)
    top = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    nll = lse[:-1] - logits[np.arange(n - 1), ids[1:]]
    return math.exp(float(nll.mean()))


def stored_ir(gguf: Path, folder: Path) -> Path:
    """The graph OpenVINO GenAI builds from ``gguf`` by itself, saved as IR in ``folder``."""
    import openvino_genai as og

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, folder / "model.gguf")
    og.LLMPipeline(str(folder / "model.gguf"), "CPU", enable_save_ov_model=True)
    (folder / "model.gguf").unlink()
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: the default model)")
    p.add_argument("--formats", default="stored,none,int8,int4", help="stored: the GGUF file as GenAI reads it")
    p.add_argument("--streams", default="1,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--out", default=str(BENCH / "results" / "formats-cpu.json"))
    a = p.parse_args(argv)
    from tokenwire.engine import models
    from tokenwire.engine.openvino import convert, ir
    from tokenwire.engine.openvino.model import plan, prepare

    found = plan(models.resolve(a.model))
    gguf = convert.converted(found.source) if found.convert else found.source
    ids = prepare(found, 8192).tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"][: a.ppl_tokens]
    reference = round(file_perplexity(gguf, ids), 3)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="formats-") as work:
        for fmt in a.formats.split(","):
            folder = stored_ir(gguf, Path(work) / "stored") if fmt == "stored" else ir.converted(gguf, fmt)
            mb = (folder / "openvino_model.bin").stat().st_size / 1e6
            row: dict[str, Any] = {"format": fmt, "mb": round(mb, 1), "file_perplexity": reference}
            row["perplexity"] = round(ir_perplexity(folder, ids), 3)
            for n in a.streams.split(","):
                argv_p = [sys.executable, str(BENCH / "ov_pipeline.py"), "--model", str(gguf), "--ir", str(folder)]
                argv_p += ["--streams", n]
                argv_p += ["--max-tokens", str(a.max_tokens), "--runs", str(a.runs)]
                done = subprocess.run(argv_p, capture_output=True, text=True, check=True, timeout=900)
                runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
                row[f"tok_s_{n}"] = round(max(r["tokens_per_s"] for r in runs), 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    streams = a.streams.split(",")
    md = [f"Perplexity of the file's own weights (transformers): {reference}", ""]
    md.append("| format | weights MB | perplexity (OpenVINO) | " + " | ".join(f"tok/s x{n}" for n in streams) + " |")
    md.append("|---|---:|---:|" + "---:|" * len(streams))
    for r in rows:
        md.append(
            f"| {r['format']} | {r['mb']} | {r['perplexity']} | "
            + " | ".join(str(r[f"tok_s_{n}"]) for n in streams)
            + " |"
        )
    out = Path(a.out)
    out.write_text(json.dumps({"model": str(gguf), "args": vars(a), "results": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
