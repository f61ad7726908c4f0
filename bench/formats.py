"""Weight formats for a Hugging Face folder converted for the OpenVINO engine: tokens/s and perplexity, side by side.

For each ``--quantize`` format the folder is converted to GGUF (engine/openvino/convert.py, cached), then
measured in one run: tokens/s of OpenVINO's pipeline in process (bench/ov_pipeline.py: the engine's ceiling) at
each stream count, and perplexity on a fixed text (the project's seed tutorial) of the same GGUF weights read back
by transformers, which dequantizes them: the error the format adds, whatever the kernels.

    python bench/formats.py [--folder HF_FOLDER] --streams 1,32 --out bench/results/formats-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TEXT = BENCH.parent.parent / "shared" / "seed" / "000_15d103f118269f62.txt"


def perplexity(gguf: Path, text: str, tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok(text)["input_ids"][:tokens]])
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    return math.exp(float(loss))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--folder", default=None, help="a Hugging Face folder (default: the default model, converted)")
    p.add_argument("--formats", default="stored,none,int8,int4", help="stored: the default model's GGUF as it is")
    p.add_argument("--streams", default="1,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--out", default=str(BENCH / "results" / "formats-cpu.json"))
    a = p.parse_args(argv)
    from tokenwire.engine import models
    from tokenwire.engine.openvino import convert

    if a.folder is None:
        from tokenwire.engine.hf.loader import local_folder

        folder = Path(local_folder(models.resolve(None)))
    else:
        folder = Path(a.folder)
    text = TEXT.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    for fmt in a.formats.split(","):
        if fmt == "stored":
            resolved = models.resolve(None)
            gguf = Path(resolved.path) / str(resolved.gguf_file)
        else:
            gguf = convert.converted(folder, fmt)
        row: dict[str, Any] = {"format": fmt, "file": gguf.name, "mb": round(gguf.stat().st_size / 1e6, 1)}
        row["perplexity"] = round(perplexity(gguf, text, a.ppl_tokens), 3)
        for n in a.streams.split(","):
            argv_p = [sys.executable, str(BENCH / "ov_pipeline.py"), "--model", str(gguf), "--streams", n]
            argv_p += ["--max-tokens", str(a.max_tokens), "--runs", str(a.runs)]
            done = subprocess.run(argv_p, capture_output=True, text=True, check=True, timeout=900)
            runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            row[f"tok_s_{n}"] = round(max(r["tokens_per_s"] for r in runs), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    streams = a.streams.split(",")
    md = ["| format | file MB | perplexity | " + " | ".join(f"tok/s x{n}" for n in streams) + " |"]
    md.append("|---|---:|---:|" + "---:|" * len(streams))
    for r in rows:
        md.append(
            f"| {r['format']} | {r['mb']} | {r['perplexity']} | "
            + " | ".join(str(r[f"tok_s_{n}"]) for n in streams)
            + " |"
        )
    out = Path(a.out)
    out.write_text(json.dumps({"folder": str(folder), "args": vars(a), "results": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
