"""GGUF file types on the OpenVINO engine: the perplexity of the weights tokenwire serves from each file, against
llama.cpp's own on the same file and the same tokens.

The default model exists only as Q4_1, so the other types are made from it: its weights decoded to F16 (exactly,
engine/openvino/ir.py), then ``llama-quantize`` to Q8_0, Q4_0 and Q4_K_M. They are re-quantized from 4-bit weights:
their quality is that of a 4-bit source, not of the original model's. ``--model`` takes another GGUF file.
``--as-qwen2`` writes the model's weights as a Qwen2 file first (the query and key rows in Qwen2's order, zero
query, key and value biases: the same function), so that the ``qwen2`` route is scored on real weights;
``--as-phi3`` as a Phi-3 file as llama.cpp's converter writes one (fused query-key-value and gate-up matrices,
heads rotated NeoX's way), for the ``phi3`` route (rewritten as Llama's layers, engine/openvino/relayout.py).

Scoring as ``llama-perplexity`` does: the text (the project's seed tutorial) tokenized once, cut into chunks of
``--ctx`` tokens (the first replaced by BOS when the file says to add one), each chunk's second half scored with
the first half as context. tokenwire's figure is the IR it serves from that file (``--quantize auto``: int8, or
``--formats`` to add others), one forward pass a chunk, on the tokens llama.cpp's count confirms are the same.

    python bench/gguf_quality.py --llama-cpp /path/to/llama.cpp/build/bin --types F16,Q8_0,Q4_0,Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TEXT = BENCH.parent.parent / "shared" / "seed" / "000_15d103f118269f62.txt"


def llama_perplexity(binary: Path, gguf: Path, ctx: int) -> tuple[float, int]:
    """llama.cpp's final perplexity estimate of ``gguf`` on the text, and how many chunks it scored."""
    out = subprocess.run(
        [str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(TEXT), "-c", str(ctx), "-b", str(ctx), "-t", "2"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LD_LIBRARY_PATH": str(binary)},
    ).stderr
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    if ppl is None or chunks is None:
        raise RuntimeError(f"llama-perplexity said:\n{out[-2000:]}")
    return float(ppl.group(1)), int(chunks.group(1))


def chunks_of(gguf: Path, ctx: int) -> list[list[int]]:
    """The text's tokens in llama-perplexity's chunks (BOS first when the file adds one)."""
    import gguf as gg

    from tokenwire.engine.openvino.model import cached_tokenizer

    _, tok, _ = cached_tokenizer(gguf)
    ids = tok.encode(TEXT.read_text(), add_special_tokens=False)
    fields = gg.GGUFReader(str(gguf)).fields
    add_bos = "tokenizer.ggml.add_bos_token" in fields and bool(fields["tokenizer.ggml.add_bos_token"].contents())
    bos = int(fields["tokenizer.ggml.bos_token_id"].contents()) if add_bos else None
    out = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = list(ids[start : start + ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def served_perplexity(gguf: Path, fmt: str, chunks: list[list[int]]) -> float:
    """Perplexity of the IR tokenwire serves from ``gguf`` in ``fmt``, scored as llama-perplexity scores."""
    import numpy as np

    from tokenwire.engine.openvino import ir

    folder = ir.converted(gguf, fmt)
    nll, n = 0.0, 0
    for chunk in chunks:
        logits = ir.logits(folder, chunk)
        first = len(chunk) // 2
        for j in range(first, len(chunk) - 1):
            row = logits[j]
            top = row.max()
            nll += float(top + math.log(np.exp(row - top).sum()) - row[chunk[j + 1]])
            n += 1
    return math.exp(nll / n)


def as_qwen2(llama: Path, target: Path) -> Path:
    """A float16 Llama GGUF written as a Qwen2 one computing the same: the metadata under ``qwen2.``, the query
    and key rows back in Hugging Face's order (llama.cpp interleaves a Llama's rotary halves, not a Qwen2's), and
    zero biases on the query, key and value."""
    import gguf as gg
    import numpy as np

    from tokenwire.engine.openvino import ir, weights

    reader = gg.GGUFReader(str(llama))
    writer = ir.copy_metadata(reader, target, gg.LlamaFileType.MOSTLY_F16, "qwen2")
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    for t in reader.tensors:
        data = np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape)))
        n = heads if t.name.endswith("attn_q.weight") else kv_heads if t.name.endswith("attn_k.weight") else 0
        if n:
            rows = data.shape[0]
            data = data[weights._orders(rows, {n})[-1]]  # the file row holding each Hugging Face row
        writer.add_tensor(t.name, data)
        for part in ("q", "k", "v"):
            if t.name.endswith(f"attn_{part}.weight"):
                writer.add_tensor(t.name.replace(".weight", ".bias"), np.zeros(data.shape[0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def as_phi3(llama: Path, target: Path) -> Path:
    """A float16 Llama GGUF written as a Phi-3 one computing the same, as llama.cpp's converter writes Phi-3: the
    metadata under ``phi3.`` (no window), the query and key rows back in Hugging Face's order (a Phi-3 rotates
    each head's halves, NeoX's way), the query, key and value in one matrix (``attn_qkv``) and the gate and up in
    one (``ffn_up``)."""
    import gguf as gg
    import numpy as np

    from tokenwire.engine.openvino import ir, weights

    reader = gg.GGUFReader(str(llama))
    writer = ir.copy_metadata(reader, target, gg.LlamaFileType.MOSTLY_F16, "phi3")
    writer.add_sliding_window(0)  # llama.cpp's converter: 0 for a model without one
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    tensors = {t.name: np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}
    for name, data in tensors.items():
        layer, _, kind = name.rpartition(".weight")[0].rpartition(".")
        if kind in ("attn_q", "attn_k"):
            continue  # in attn_qkv
        if kind == "attn_v":
            q, k = (tensors[f"{layer}.{part}.weight"] for part in ("attn_q", "attn_k"))
            q = q[weights._orders(q.shape[0], {heads})[-1]]  # the file row holding each Hugging Face row
            k = k[weights._orders(k.shape[0], {kv_heads})[-1]]
            writer.add_tensor(f"{layer}.attn_qkv.weight", np.concatenate([q, k, data]))
        elif kind == "ffn_gate":
            continue  # in ffn_up
        elif kind == "ffn_up":
            writer.add_tensor(name, np.concatenate([tensors[f"{layer}.ffn_gate.weight"], data]))  # gate first
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, help="llama.cpp's build/bin (llama-quantize, llama-perplexity)")
    p.add_argument("--model", default=None, help="a GGUF file (default: the default model, Q4_1)")
    p.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M", help="file types made with llama-quantize from F16")
    p.add_argument("--formats", default="int8", help="tokenwire --quantize formats to score (int8 = what auto serves)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--as-qwen2", action="store_true", help="score the model written as a Qwen2 file")
    p.add_argument("--as-phi3", action="store_true", help="score the model written as a Phi-3 file (llama.cpp's)")
    p.add_argument("--out", default=str(BENCH / "results" / "gguf-quality-cpu.json"))
    a = p.parse_args()
    binary = Path(a.llama_cpp)
    from tokenwire.engine import models
    from tokenwire.engine.openvino import ir

    source = Path(a.model) if a.model else models.default_model_path()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TOKENWIRE_CACHE_DIR"] = str(Path(tmp) / "cache")  # every IR made fresh
        f16 = Path(tmp) / f"{source.stem}.F16.gguf"
        ir.dequantize_gguf(source, f16)
        files = {"as given": source}
        if a.as_qwen2 or a.as_phi3:
            family, write = ("qwen2", as_qwen2) if a.as_qwen2 else ("phi3", as_phi3)
            source = write(f16, Path(tmp) / f"{source.stem}-as-{family}.F16.gguf")
            f16 = source
            files = {}
        for kind in a.types.split(","):
            if kind == "F16":
                files[kind] = f16
                continue
            target = Path(tmp) / f"{source.stem}.{kind}.gguf"
            subprocess.run(
                [str(binary / "llama-quantize"), str(f16), str(target), kind],
                check=True,
                capture_output=True,
                env={**os.environ, "LD_LIBRARY_PATH": str(binary)},
            )
            files[kind] = target
        for kind, path in files.items():
            theirs, count = llama_perplexity(binary, path, a.ctx)
            chunks = chunks_of(path, a.ctx)
            if len(chunks) != count:
                raise RuntimeError(f"{kind}: llama.cpp scored {count} chunks, tokenwire's tokens make {len(chunks)}")
            row: dict[str, Any] = {"type": kind, "file_mb": round(path.stat().st_size / 1e6, 1), "llama_cpp": theirs}
            for fmt in a.formats.split(","):
                row[fmt] = served_perplexity(path, fmt, chunks)
                row[f"{fmt}_vs_llama_cpp"] = row[fmt] / theirs
            rows.append(row)
            print(json.dumps(row), flush=True)
    fmts = a.formats.split(",")
    table = [
        "| file | MB | llama.cpp PPL | " + " | ".join(f"tokenwire {f} PPL | ratio" for f in fmts) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(fmts),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f]:.3f} | {r[f + '_vs_llama_cpp']:.3f}" for f in fmts)
        table.append(f"| {r['type']} | {r['file_mb']} | {r['llama_cpp']:.3f} | {cells} |")
    text = "\n".join(table)
    print(text)
    out = Path(a.out)
    out.write_text(json.dumps({"model": source.name, "ctx": a.ctx, "rows": rows}, indent=1))
    flag = " --as-qwen2" if a.as_qwen2 else " --as-phi3" if a.as_phi3 else ""
    out.with_suffix(".md").write_text(
        f"bench/gguf_quality.py{flag} on {source.name} (types made from its weights "
        f"decoded to F16), ctx {a.ctx}\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
