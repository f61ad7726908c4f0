"""The default model's Q4_1 weights, held exactly in an OpenVINO IR: its perplexity, for bench/ov_step.py's timing.

A Q4_1 block is ``d * q + m`` (4-bit ``q``, a float scale ``d`` and minimum ``m`` per 32 inputs). OpenVINO's
decompression pattern ``scale * (q - zero)`` holds it exactly when ``zero`` is a float (``-m / d``); an integer
zero point (what OpenVINO GenAI's own GGUF reader stores) moves every weight of a block by up to half a step.
This writes both from tokenwire's float16 IR of the default model (engine/openvino/ir.py; the embedding stays
int8, as in the int4 format): ``u4-f16zero-32`` (exact) and ``u4-u4zero-32`` (GenAI's rounding), and prints the
perplexity OpenVINO computes from each on the fixed text of bench/formats.py, next to tokenwire's formats.
Time them with ``python bench/ov_step.py --ir FOLDER``.

    python bench/q4_1_ir.py --out /tmp/q4_1-ir
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from formats import TEXT, ir_perplexity


def q4_1(w: Any, float_zero: bool, group: int = 32) -> Any:
    """``w`` (rows × inputs) as 4-bit groups of ``group`` inputs with a scale and a zero point each."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    scale = (hi - lo) / 15.0
    scale[scale == 0] = 1.0
    if float_zero:
        q = np.clip(np.rint((g - lo) / scale), 0, 15).astype(np.uint8)
        zero = ops.constant((-lo / scale).astype(np.float16))
    else:
        z = np.clip(np.rint(-lo / scale), 0, 15)
        q = np.clip(np.rint(g / scale) + z, 0, 15).astype(np.uint8)
        zero = ops.convert(ops.constant(z.astype(np.uint8), dtype=ov.Type.u4), ov.Type.f16)
    deq = ops.subtract(ops.convert(ops.constant(q, dtype=ov.Type.u4), ov.Type.f16), zero)
    deq = ops.multiply(deq, ops.constant(scale.astype(np.float16)))
    deq = ops.reshape(deq, ops.constant(np.array([rows, cols], dtype=np.int64)), special_zero=False)
    return ops.convert(deq, ov.Type.f32).output(0)


def write(source: Path, target: Path, float_zero: bool) -> Path:
    import openvino as ov

    from tokenwire.engine.openvino import formats

    model = ov.Core().read_model(str(source / "openvino_model.xml"))
    for op in model.get_ordered_ops():
        converts = formats.weight_converts(op, ov)
        if not converts:
            continue
        w = op.get_data().astype("float32")
        embedding = any(c.get_type_name() == "Gather" for cv in converts for c in formats.consumers(cv))
        replacement = formats.int8_rows(w) if embedding else q4_1(w, float_zero)
        for cv in converts:
            cv.output(0).replace(replacement)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    ov.save_model(model, str(target / "openvino_model.xml"), compress_to_fp16=False)
    for path in source.iterdir():
        if path.is_file() and "tokenizer" in path.name:
            shutil.copy(path, target / path.name)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the default model's Q4_1 weights in an IR, exactly and as GenAI rounds")
    p.add_argument("--out", type=Path, default=Path("/tmp/q4_1-ir"), help="the IR folders go here")
    p.add_argument("--ppl-tokens", type=int, default=1024)
    a = p.parse_args(argv)
    from tokenwire.engine import models
    from tokenwire.engine.openvino import ir
    from tokenwire.engine.openvino.model import plan, prepare

    resolved = models.resolve(None)
    assert resolved.gguf_file is not None
    gguf = Path(resolved.path) / resolved.gguf_file
    ids = prepare(plan(resolved), 8192).tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"][: a.ppl_tokens]
    folders = {
        "u4-f16zero-32": write(ir.converted(gguf, "none"), a.out / "u4-f16zero-32", float_zero=True),
        "u4-u4zero-32": write(ir.converted(gguf, "none"), a.out / "u4-u4zero-32", float_zero=False),
        **{fmt: ir.converted(gguf, fmt) for fmt in ("none", "int8", "int4")},
    }
    print(f"perplexity on the first {len(ids)} tokens of {TEXT.name}, computed by OpenVINO:")
    for name, folder in folders.items():
        print(f"  {name:14s} {ir_perplexity(folder, ids):7.3f}  {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
