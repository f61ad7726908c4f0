"""The OpenVINO IR tokenwire runs: made once from a GGUF file, with weights tokenwire quantizes itself.

OpenVINO GenAI reads GGUF files, but not exactly: it stores a Q4_1 block's float minimum as a rounded 4-bit
zero point, and the default model (Q4_1) then scores perplexity 12.0 on the benchmark text where its own weights
score 8.9 (docs/benchmarks.md). So every GGUF model goes the same way, once:

1. OpenVINO GenAI builds its graph from the file and saves it as IR (``enable_save_ov_model``). A file whose
   blocks GenAI reads (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: a Q4_K_M file) is handed over as it is, and every weight
   of the graph is then replaced by the file's own values, decoded exactly (``weights.take_file_weights``; GenAI's
   reading only gives the graph its shape); any other file is first written dequantized to a float16 GGUF (the
   ``gguf`` package decodes every block type exactly). A file in float16 or float32 is used as it is;
2. the IR save stores float32 constants as float16, so those that are the file's float32 tensors (the norms) or
   the rotary frequencies are put back in float32 (``weights.restore_float32``);
3. a sliding attention window the file names (``attention.sliding_window``, per layer
   ``attention.sliding_window_pattern``) is built into those layers' masks (``graph.apply_windows``), in the form
   OpenVINO's continuous-batching transformation reads as a window for its paged attention; an
   ``attention.scale`` (Phi-3's LongRoPE) becomes each attention's scale (``graph.apply_scale``);
4. projections of one input (a layer's query, key and value; its gate and up) become one matrix product whose
   result is split (``formats.fuse_projections``: fewer, larger products, the same arithmetic);
5. every weight matrix is quantized here, in numpy (``formats.quantize``): ``int8`` (one scale and zero point per
   output row), ``int4`` (4-bit, a scale per 64 or 32 inputs; the embedding matrix, also the output layer, in
   int8) or ``none`` (float16). Weights taken from the file in step 1 were fused and quantized as they were
   taken, a group at a time (no float16 copy of the whole model is ever held).

The steps' code: weights.py (the file's own weights), formats.py (fused products, int8, int4, float16) and graph.py
(what the file asks beyond GenAI's layers: windows, scales, Gemma's additions). The result is kept in the cache
directory as ``<name>-<content key>-<format>-ir/`` with ``tokenwire-ir.json`` written last, naming each file's
size: a folder without it, or whose files differ from it, is a partial or corrupt conversion and is made again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.openvino import relayout
from tokenwire.engine.openvino.formats import fuse_projections, quantize
from tokenwire.engine.openvino.graph import apply_family, apply_scale, apply_windows, windows
from tokenwire.engine.openvino.weights import WeightsNotFound, restore_float32, take_file_weights

log = logging.getLogger(__name__)

IR_VERSION = 4  # 3: rope_freqs (Llama 3.1+ rope scaling) applied to the rotary frequencies; 4: in quantized files too
FORMATS = ("none", "int8", "int4")
MARKER = "tokenwire-ir.json"


def converted(gguf: Path, fmt: str) -> Path:
    """The IR folder of ``gguf`` with ``fmt`` weights, made now if missing, partial or corrupt."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = models.cache_dir() / f"{gguf.stem}-{models.gguf_cache_key(gguf)}-{fmt}-ir"
    if whole(target):
        return target
    if target.exists():
        log.warning("the converted model at %s is incomplete or corrupt; converting again", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to OpenVINO IR (%s weights; one time, cached at %s)", gguf.name, fmt, target)
    import gguf as gg

    reader = gg.GGUFReader(str(gguf))  # read once (seconds: it parses the whole vocabulary), used by every step
    with tempfile.TemporaryDirectory(prefix="tokenwire-ir-", dir=target.parent) as work:
        exported, built = Path(work) / "export", Path(work) / "out"
        source = gguf
        arch = reader.fields["general.architecture"].contents()
        if arch in relayout.REWRITTEN:  # an architecture GenAI does not build, written as one it builds
            from tokenwire.engine.openvino.model import cached_tokenizer

            source = Path(work) / f"{gguf.stem}-as-{relayout.REWRITTEN[arch]}.gguf"
            relayout.rewrite(gguf, source, reader, cached_tokenizer(gguf)[1])
            reader = gg.GGUFReader(str(source))
        try:
            export(source, exported, reader)
            quantize_folder(exported, built, fmt, reader)
        except WeightsNotFound as exc:  # GenAI built weights this cannot tell apart: from a float16 copy instead
            log.warning("%s; converting %s through a float16 copy", exc, gguf.name)
            shutil.rmtree(exported, ignore_errors=True)
            shutil.rmtree(built, ignore_errors=True)
            export(source, exported, reader, copy=True)
            quantize_folder(exported, built, fmt, reader)
        _mark(built, gguf, fmt)
        try:
            os.replace(built, target)
        except OSError:  # another process (a replica starting beside this one) put its copy there first
            if not whole(target):
                raise
    return target


def whole(folder: Path) -> bool:
    """Whether ``folder`` is a complete conversion: its marker names the sizes its files have."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        sizes = marker["sizes"]
        return marker.get("version") == IR_VERSION and all(
            (folder / name).stat().st_size == size for name, size in sizes.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _mark(folder: Path, gguf: Path, fmt: str) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    marker = {"version": IR_VERSION, "source": gguf.name, "format": fmt, "sizes": sizes}
    (folder / MARKER).write_text(json.dumps(marker))  # last: its presence says the folder is whole


def export(gguf: Path, folder: Path, reader: Any, copy: bool = False) -> None:
    """OpenVINO GenAI's graph of ``gguf`` (open in ``reader``, a ``GGUFReader``) as IR in ``folder``, and its
    tokenizer models beside it: built from the file itself when its matrices are float16 or float32, or blocks
    GenAI reads (their values are taken from the file afterwards), else (or with ``copy``) from a float16 copy."""
    import openvino_genai as og

    folder.mkdir(parents=True)
    source = folder / "model.gguf"
    if _unquantized(reader) or (_genai_reads(reader) and not copy):  # the weights are taken from the file after
        source.symlink_to(gguf.resolve())
    else:
        dequantize_gguf(gguf, source, reader)
    # GenAI saves what it built next to the file it read; compiling is part of building the pipeline
    try:
        og.LLMPipeline(str(source), "CPU", enable_save_ov_model=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise models.NotForOpenVINO(
            f"the openvino engine cannot read {gguf.name}: OpenVINO GenAI says {reason!r} (use --engine transformers)"
        ) from exc
    source.unlink()
    if not (folder / "openvino_model.xml").is_file():
        raise RuntimeError(f"OpenVINO GenAI did not save an IR for {gguf}")


def _unquantized(reader: Any) -> bool:
    """Matrices in float16 (GenAI builds no float32 matrix), vectors in float16 or float32."""
    import gguf as gg

    q = gg.GGMLQuantizationType
    return all(t.tensor_type == q.F16 or (t.tensor_type == q.F32 and _vector(t)) for t in reader.tensors)


def _genai_reads(reader: Any) -> bool:
    """Whether OpenVINO GenAI's reader builds every tensor of the file (open in ``reader``) from its own blocks
    (float32 only for vectors: "Unsupported quantization type" for a float32 matrix)."""
    import gguf as gg

    q = gg.GGMLQuantizationType
    blocks = (q.F16, q.Q4_0, q.Q4_1, q.Q8_0, q.Q4_K, q.Q6_K)
    return all(t.tensor_type in blocks or (t.tensor_type == q.F32 and _vector(t)) for t in reader.tensors)


def _vector(t: Any) -> bool:
    return sum(int(d) > 1 for d in t.shape) <= 1


def dequantize_gguf(src: Path, dst: Path, reader: Any = None) -> None:
    """``src`` written again with every quantized tensor (and float32 matrix) decoded to float16: the same metadata
    and tokenizer.
    ``reader``: ``src`` already open in a ``GGUFReader``."""
    import gguf as gg
    import numpy as np
    from tqdm import tqdm

    reader = reader if reader is not None else gg.GGUFReader(str(src))
    writer = copy_metadata(reader, dst, gg.LlamaFileType.MOSTLY_F16)
    for t in tqdm(reader.tensors, desc="decoding the GGUF weights", unit="tensor"):
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
        if t.tensor_type in (gg.GGMLQuantizationType.F32, gg.GGMLQuantizationType.F16):
            data = np.asarray(t.data).reshape(shape)
            data = data if _vector(t) else data.astype(np.float16)  # a float32 matrix too: GenAI builds none
        else:
            data = gg.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float16)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_metadata(reader: Any, dst: Path, file_type: int, arch: str | None = None) -> Any:
    """A ``GGUFWriter`` for ``dst`` with every metadata field ``reader`` (a ``GGUFReader``) has (the tokenizer
    too), the file type set to ``file_type`` (OpenVINO GenAI reads it) and the architecture named ``arch`` if
    given (its keys, ``<architecture>.*``, then under that name); the caller adds the tensors and writes."""
    import gguf as gg

    own = reader.fields["general.architecture"].contents()
    writer = gg.GGUFWriter(str(dst), arch or own)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = int(file_type) if name == "general.file_type" else field.contents()
        sub = field.types[-1] if field.types[0] == gg.GGUFValueType.ARRAY else None
        key = f"{arch}.{name[len(own) + 1 :]}" if arch and name.startswith(f"{own}.") else name
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    return writer


def quantize_folder(src: Path, dst: Path, fmt: str, reader: Any) -> None:
    """The IR in ``src`` (exported from the GGUF file open in ``reader``) with its weights in ``fmt``, saved to
    ``dst`` with the tokenizer models beside it."""
    import openvino as ov

    model = ov.Core().read_model(str(src / "openvino_model.xml"))
    taken = take_file_weights(model, reader, fmt)
    if taken:
        log.info("%d weight matrices taken from the file, decoded exactly, in %s", taken, fmt)
    restored = restore_float32(model, reader)
    windowed = apply_windows(model, windows(reader))
    if windowed:
        log.info("attention windows built into %d layers", windowed)
    arch = reader.fields["general.architecture"].contents()
    if (scale := reader.fields.get(f"{arch}.attention.scale")) is not None:
        apply_scale(model, float(scale.contents()))
    if extras := apply_family(model, reader):
        log.info("built into the graph from the file: %s", ", ".join(extras))
    fused = fuse_projections(model)
    count = quantize(model, fmt)
    log.debug("%d float32 constants restored, %d groups of projections fused", restored, fused)
    log.info("quantized %d weight matrices to %s", count, fmt)
    dst.mkdir(parents=True)
    ov.save_model(model, str(dst / "openvino_model.xml"), compress_to_fp16=False)
    for path in src.iterdir():
        if path.is_file() and "tokenizer" in path.name:
            shutil.copy(path, dst / path.name)


def logits(folder: Path, ids: list[int], properties: dict[str, str] | None = None) -> Any:
    """The logits (tokens × vocabulary, float64) the IR in ``folder`` gives ``ids`` in one forward pass: what
    bench/formats.py's perplexity and the tests' comparisons read. ``properties``: OpenVINO compile settings."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(folder / "openvino_model.xml"))
    request = core.compile_model(model, "CPU", properties or {}).create_infer_request()
    n = len(ids)
    request.infer(
        {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
    )
    return request.get_tensor("logits").data[0].astype(np.float64)
