"""The OpenVINO IR tokenwire runs: made once from a GGUF file, with weights tokenwire quantizes itself.

OpenVINO GenAI reads GGUF files, but not exactly: it stores a Q4_1 block's float minimum as a rounded 4-bit
zero point, and the default model (Q4_1) then scores perplexity 12.0 on the benchmark text where its own weights
score 8.9 (docs/benchmarks.md). So every GGUF model goes the same way, once:

1. OpenVINO GenAI builds its graph from the file and saves it as IR (``enable_save_ov_model``). A file whose
   blocks GenAI reads (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: a Q4_K_M file) is handed over as it is, and every weight
   of the graph is then replaced by the file's own values, decoded exactly (:func:`take_file_weights`; GenAI's
   reading only gives the graph its shape); any other file is first written dequantized to a float16 GGUF (the
   ``gguf`` package decodes every block type exactly). A file in float16 or float32 is used as it is;
2. the IR save stores float32 constants as float16, so those that are the file's float32 tensors (the norms) or
   the rotary frequencies are put back in float32 (:func:`restore_float32`);
3. a sliding attention window the file names (``attention.sliding_window``, per layer
   ``attention.sliding_window_pattern``) is built into those layers' masks (:func:`apply_windows`), in the form
   OpenVINO's continuous-batching transformation reads as a window for its paged attention; an
   ``attention.scale`` (Phi-3's LongRoPE) becomes each attention's scale (:func:`apply_scale`);
4. projections of one input (a layer's query, key and value; its gate and up) become one matrix product whose
   result is split (:func:`fuse_projections`: fewer, larger products, the same arithmetic);
5. every weight matrix is quantized here, in numpy (:func:`quantize`): ``int8`` (one scale and zero point per
   output row), ``int4`` (4-bit, a scale per 64 or 32 inputs; the embedding matrix, also the output layer, in
   int8) or ``none`` (float16). Weights taken from the file in step 1 were fused and quantized as they were
   taken, a group at a time (no float16 copy of the whole model is ever held).

The result is kept in the cache directory as ``<name>-<content key>-<format>-ir/`` with ``tokenwire-ir.json``
written last, naming each file's size: a folder without it, or whose files differ from it, is a partial or
corrupt conversion and is made again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenwire.engine import models
from tokenwire.engine.openvino import relayout

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


class WeightsNotFound(ValueError):
    """A weight of GenAI's graph matches no tensor of the file, or more than one that differ."""


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


def take_file_weights(model: Any, reader: Any, fmt: str) -> int:
    """Replace every weight GenAI built from the file's blocks (a low-bit constant decompressed by Convert, Subtract
    of a zero point, Multiply by a scale, Reshape, Convert) with the file's tensor decoded exactly by the ``gguf``
    package, in ``fmt`` (:func:`quantize`'s forms), the projections of one input stacked into one product
    (:func:`fuse_projections`' form). GenAI's own reading is only near (a Q4_K weight is 4-5% off: it rounds the
    blocks' minimums), and it puts a Llama query's and key's rows back in Hugging Face's order. Each weight is told
    from the others by its values: rows of it as GenAI decoded them against every tensor of its shape, in the
    file's row order or that one. One group of weights is decoded at a time, so the conversion holds the result
    and one group beside the graph. The number of weights replaced; one that matches no tensor raises (the graph
    is not what this reads)."""
    import numpy as np

    arch = reader.fields["general.architecture"].contents()
    heads = {
        int(f.contents()) for k in ("head_count", "head_count_kv") if (f := reader.fields.get(f"{arch}.attention.{k}"))
    }
    tensors: dict[tuple[int, int], list[Any]] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            tensors.setdefault((int(t.shape[1]), int(t.shape[0])), []).append(t)
    weights: dict[tuple[int, int], tuple[Any, Any, Any]] = {}  # chain output -> (output, tensor, row order)
    first_rows: dict[str, Any] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul", "Gather"):
            continue
        output = op.input(1 if kind == "MatMul" else 0).get_source_output()
        key = (output.get_node().get_instance_id(), output.get_index())
        if key in weights or not output.get_partial_shape().is_static or len(output.get_partial_shape()) != 2:
            continue
        shape = tuple(int(d) for d in output.get_shape())
        sample = _sample(shape[0])
        rows = _compressed_rows(output.get_node(), sample)
        if rows is None:
            continue
        found = _matching_tensor(rows, sample, tensors.get(shape, []), heads, first_rows)  # type: ignore[arg-type]
        if found is None:
            raise WeightsNotFound(f"a {shape} weight of GenAI's graph matches no one tensor of the file")
        weights[key] = (output, *found)
    groups: dict[Any, list[tuple[Any, Any, Any]]] = {}
    for chain, (output, t, order) in weights.items():
        users = [i.get_node() for i in output.get_target_inputs()]
        source = _stackable_input(users[0]) if len(users) == 1 else None
        # alone, unless it is one of the products of one input
        groups.setdefault(chain if source is None else ("input", *source), []).append((output, t, order))

    def prepared(members: list[tuple[Any, Any, Any]]) -> Any:  # numpy only (off the graph): two run at once
        decoded = [_exact(t)[order] for _, t, order in members]
        users = [i.get_node().get_type_name() for out, _, _ in members for i in out.get_target_inputs()]
        return _formatted_arrays(np.concatenate(decoded) if len(decoded) > 1 else decoded[0], fmt, "Gather" in users)

    pending = list(groups.values())
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = deque(pool.submit(prepared, members) for members in pending[:2])  # two groups in memory at most
        for i, members in enumerate(pending):
            weight = _formatted_node(running.popleft().result())
            if i + 2 < len(pending):
                running.append(pool.submit(prepared, pending[i + 2]))
            if len(members) == 1:
                members[0][0].replace(weight)
            else:
                _stacked_product([next(iter(out.get_target_inputs())).get_node() for out, _, _ in members], weight)
    return len(weights)


def _formatted_arrays(w: Any, fmt: str, embedding: bool) -> tuple[str, tuple[Any, ...]]:
    """The weight matrix ``w`` (float32, consumed) in ``fmt`` as :func:`quantize` writes it, as numpy arrays."""
    import numpy as np

    if fmt == "none":
        return "none", (w.astype(np.float16),)
    if fmt == "int8" or embedding:
        return "int8", _int8_arrays(w)
    return "int4", _int4_arrays(w)


def _formatted_node(prepared: tuple[str, tuple[Any, ...]]) -> Any:
    """The graph's float32 weight from :func:`_formatted_arrays`' arrays."""
    import openvino as ov
    import openvino.opset13 as ops

    kind, arrays = prepared
    if kind == "none":
        return ops.convert(ops.constant(arrays[0]), ov.Type.f32).output(0)
    return _int8_node(*arrays) if kind == "int8" else _int4_node(*arrays)


def _stackable_input(op: Any) -> tuple[int, int] | None:
    """The input (node id, output index) of ``op`` if it is a product ``x @ W.T`` that can share one stacked weight
    with the other products of ``x`` (:func:`_stacked_product`), else None."""
    if op.get_type_name() != "MatMul" or not op.get_attributes().get("transpose_b"):
        return None
    if op.get_attributes().get("transpose_a"):
        return None
    source = op.input(0).get_source_output()
    return source.get_node().get_instance_id(), source.get_index()


def _stacked_product(products: list[Any], weight: Any) -> None:
    """Replace ``products`` (MatMuls of one input, each with its own weight) by one product with ``weight``, their
    weights stacked in their order, split back into their outputs."""
    import numpy as np
    import openvino.opset13 as ops

    product = ops.matmul(products[0].input(0).get_source_output(), weight, False, True)
    rows = np.array([int(p.input(1).get_source_output().get_shape()[0]) for p in products], dtype=np.int64)
    split = ops.variadic_split(product, ops.constant(np.int64(-1)), ops.constant(rows))
    for i, p in enumerate(products):
        p.output(0).replace(split.output(i))


def _sample(rows: int) -> Any:
    """The rows compared: the first two, then rows spread over the matrix (no two row orders _orders gives agree on
    all of them)."""
    import numpy as np

    return np.unique(np.array([0, 1, 5, 17, 40, 101, 333, rows // 3, rows // 2 + 7, rows - 2]) % rows)


def _exact(t: Any, rows: Any = None) -> Any:
    """A GGUF tensor (or the rows ``rows`` index) decoded exactly to float32, one row per output."""
    import gguf as gg
    import numpy as np

    data = t.data if rows is None else t.data[rows]
    if t.tensor_type in (gg.GGMLQuantizationType.F32, gg.GGMLQuantizationType.F16):
        return np.asarray(data, dtype=np.float32).reshape(len(data), -1)
    return gg.quants.dequantize(data, t.tensor_type).astype(np.float32)


def _orders(rows: int, heads: set[int]) -> list[Any]:
    """The row orders GenAI may give a file's matrix: the file's, and for each head count dividing it, Hugging
    Face's order of a Llama query or key (llama.cpp's converter interleaves each head's rotary halves)."""
    import numpy as np

    out = [np.arange(rows)]
    for n in sorted(heads):
        if rows % (2 * n) == 0:
            file_holds = np.arange(rows).reshape(n, 2, rows // n // 2).swapaxes(1, 2).reshape(-1)
            out.append(np.argsort(file_holds))  # the file row holding each Hugging Face row
    return out


def _matching_tensor(
    rows: Any, sample: Any, candidates: list[Any], heads: set[int], first_rows: dict[str, Any]
) -> tuple[Any, Any] | None:
    """The tensor among ``candidates`` and the row order in which its rows ``sample`` are ``rows`` (within GenAI's
    rounding: a few percent, where any other tensor or order is off by its whole size), or None. The tensor is
    found by its first row, which no order moves (``first_rows`` keeps each tensor's, decoded once), the order by
    the rest."""
    import numpy as np

    def error(want: Any, got: Any) -> float:
        return float(np.abs(want - got).max() / (np.abs(want).max() or 1.0))

    errors = []
    for t in candidates:
        if t.name not in first_rows:
            first_rows[t.name] = _exact(t, [0])[0]
        if error(first_rows[t.name], rows[0]) > 0.2:
            continue
        for order in _orders(int(t.shape[1]), heads):
            errors.append((error(_exact(t, order[sample]), rows), t, order))
    errors.sort(key=lambda e: e[0])
    if not errors or errors[0][0] > 0.2:
        return None
    if len(errors) > 1 and errors[1][0] < 2 * errors[0][0]:  # as near: only if it holds the same values
        best, second = (_exact(t, order) for _, t, order in errors[:2])
        if not np.array_equal(best, second):
            return None
    return errors[0][1], errors[0][2]


def _compressed_rows(node: Any, rows: Any) -> Any:
    """The rows ``rows`` (float32) of the weight ``node`` computes, if it is a weight GenAI decompresses from
    low-bit constants (Convert(Reshape(Multiply(Subtract(Convert(q), Convert(zero)), scale))), the Subtract absent
    without zero points); None for anything else."""
    import openvino as ov

    if node.get_type_name() != "Convert":
        return None
    inner = node.input(0).get_source_output().get_node()
    if inner.get_type_name() != "Reshape":
        return None
    width = int(inner.get_output_shape(0)[1])
    try:
        value = _evaluate(inner.input(0).get_source_output().get_node(), rows, ov)
    except _NotDecompression:
        return None
    return value.reshape(len(rows), width)


class _NotDecompression(Exception):
    pass


def _evaluate(node: Any, rows: Any, ov: Any) -> Any:
    """The rows ``rows`` (along the first axis) of a decompression chain's value, in numpy."""
    import numpy as np

    kind = node.get_type_name()
    args = [i.get_source_output().get_node() for i in node.inputs()]
    if kind == "Multiply":
        return _evaluate(args[0], rows, ov) * _evaluate(args[1], rows, ov)
    if kind == "Subtract":
        return _evaluate(args[0], rows, ov) - _evaluate(args[1], rows, ov)
    if kind == "Convert":
        return _evaluate(args[0], rows, ov)
    if kind != "Constant":
        raise _NotDecompression(kind)
    shape = [int(d) for d in node.get_output_shape(0)]
    element = node.get_element_type()
    if shape[0] == 1:  # one value for every row
        rows = np.zeros(len(rows), dtype=np.int64)
    if element in (ov.Type.u4, ov.Type.i4):  # two a byte, the first in the low nibble
        per_row = int(np.prod(shape[1:]))
        if per_row % 2:
            raise _NotDecompression("a 4-bit row of odd length")
        packed = np.asarray(node.get_data(), dtype=np.uint8).reshape(shape[0], per_row // 2)[rows]
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16)
        if element == ov.Type.i4:
            values = np.where(values > 7, values - 16, values)
        return values.reshape(len(rows), *shape[1:]).astype(np.float32)
    if element not in (ov.Type.u8, ov.Type.i8, ov.Type.f16, ov.Type.f32):
        raise _NotDecompression(str(element))
    return np.asarray(node.get_data()).reshape(shape)[rows].astype(np.float32)


def restore_float32(model: Any, reader: Any) -> int:
    """Put back in float32 the small constants the IR save stored as float16 (a float16 constant feeding a
    Convert) whose float16 values are those of one of the GGUF file's float32 tensors (``reader``: the file open
    in a ``GGUFReader``), or of the rotary frequencies its metadata gives; the number restored. The rotary
    frequencies are put in exactly, divided by the file's ``rope_freqs``, also where GenAI keeps them in float32 (a
    graph it built from quantized blocks). Matrices are left to :func:`quantize`."""
    import gguf as gg
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    candidates: dict[bytes, list[Any]] = {}
    arrays = [np.asarray(t.data) for t in reader.tensors if t.tensor_type == gg.GGMLQuantizationType.F32]
    for a in arrays:
        candidates.setdefault(a.astype(np.float16).tobytes(), []).append(a.astype(np.float32).reshape(-1))
    arch = reader.fields["general.architecture"].contents()
    base, dims = reader.fields.get(f"{arch}.rope.freq_base"), reader.fields.get(f"{arch}.rope.dimension_count")
    rotary = None  # the plain rotary frequencies, rounded to float16 (the key they are found by)
    if base is not None and dims is not None:
        n = int(dims.contents())
        freqs = 1.0 / float(base.contents()) ** (np.arange(0, n, 2, dtype=np.float64) / n)
        divisors = rope_divisors(reader)
        if divisors is not None and divisors.shape == freqs.shape:
            freqs = freqs / divisors  # GenAI's reader builds plain RoPE: Llama 3's scaling is put in here
        key = (1.0 / float(base.contents()) ** (np.arange(0, n, 2, dtype=np.float64) / n)).astype(np.float16)
        candidates[key.tobytes()] = [freqs.astype(np.float32)]
        rotary = key.tobytes()
    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() not in (ov.Type.f16, ov.Type.f32):
            continue
        shape = list(op.get_output_shape(0))
        if sum(d > 1 for d in shape) != 1:  # one axis of values: a vector
            continue
        values = op.get_data().astype(np.float16).tobytes()
        if op.get_element_type() == ov.Type.f32:  # the rotary frequencies of a graph built from quantized blocks
            if rotary is not None and values == rotary:
                op.output(0).replace(ops.constant(candidates[rotary][0].reshape(shape)).output(0))
                count += 1
            continue
        found = candidates.get(values)
        users = _consumers(op)
        if not found or any(not np.array_equal(found[0], f) for f in found) or not users:
            continue
        if any(u.get_type_name() != "Convert" or u.get_output_element_type(0) != ov.Type.f32 for u in users):
            continue
        exact = ops.constant(found[0].reshape(shape)).output(0)
        for u in users:
            u.output(0).replace(exact)
        count += 1
    return count


def rope_divisors(reader: Any) -> Any:
    """The divisor of each rotary frequency a GGUF file asks for (None: plain RoPE): its ``rope_freqs`` tensor
    (Llama 3.1 and later, as llama.cpp's converter writes it, and tokenwire's), which OpenVINO GenAI's reader
    ignores."""
    import numpy as np

    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return np.asarray(t.data, dtype=np.float64).reshape(-1)
    return None


def windows(reader: Any) -> list[int]:
    """Each layer's attention window a GGUF file (open in ``reader``) names, 0 for the whole context: llama.cpp's
    ``attention.sliding_window``, for the layers ``attention.sliding_window_pattern`` marks (every layer without
    it). Empty when the file names none."""
    arch = reader.fields["general.architecture"].contents()
    window = reader.fields.get(f"{arch}.attention.sliding_window")
    if window is None or not int(window.contents()):
        return []
    layers = int(reader.fields[f"{arch}.block_count"].contents())
    pattern = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    marks = [bool(x) for x in pattern.contents()] if pattern is not None else [True] * layers
    if len(marks) != layers:
        raise ValueError(f"the file's sliding_window_pattern has {len(marks)} layers, its model {layers}")
    return [int(window.contents()) if mark else 0 for mark in marks]


def apply_windows(model: Any, per_layer: list[int]) -> int:
    """Limit each layer's attention to its window (``per_layer``: one per attention, in order; 0 leaves one whole):
    its mask becomes ``Select(kv > q - window and ..., mask, -inf)`` with the window a constant. That is what
    transformers computes (a query at position q sees keys after q - window), and the form OpenVINO's
    SDPA-to-PagedAttention transformation recognizes (its gpt-oss pattern): continuous batching then runs paged
    attention with that window. The number of layers windowed."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from openvino import opset15

    if not any(per_layer):
        return 0
    attentions = [op for op in model.get_ordered_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    if len(attentions) != len(per_layer):
        raise ValueError(f"the model has {len(attentions)} attention layers and the file names {len(per_layer)}")

    def const(value: Any, dtype: Any = np.int64) -> Any:
        return ops.constant(np.array(value, dtype=dtype))

    queries = ops.unsqueeze(model.input("position_ids"), const([1, 3]))  # [batch, 1, queries, 1]
    true = const(True, np.bool_)
    count = 0
    for attention, window in zip(attentions, per_layer, strict=True):
        if not window:
            continue
        mask = attention.input(3).get_source_output()  # [batch, 1, queries, keys], additive
        shape = ops.shape_of(mask)
        keys = ops.range(const(0), ops.gather(shape, const(3), const(0)), const(1), ov.Type.i64)
        keys = ops.reshape(keys, const([1, 1, 1, -1]), special_zero=False)
        inside = ops.greater(keys, ops.add(queries, const(-window)))
        # the four ANDs with "true" are the pattern's shape (gpt-oss ANDs causal, padding and window masks there)
        both = ops.bitwise_and(ops.bitwise_and(true, inside), true)
        both = ops.bitwise_and(ops.bitwise_and(true, both), true)
        kept = ops.select(ops.broadcast(both, shape), mask, const(-np.inf, np.float32))
        whole = opset15.slice(kept, const([0]), const([np.iinfo(np.int64).max]), const([1]), const([3]))
        attention.input(3).replace_source_output(whole.output(0))
        count += 1
    return count


def apply_scale(model: Any, scale: float) -> int:
    """Give every attention ``scale`` as what its scores (query times key) are multiplied by, in place of
    1/sqrt(head size); the number changed. Exact where scaling the weights would round them to float16."""
    import numpy as np
    import openvino.opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention" or len(op.inputs()) != 4:
            continue
        inputs = [i.get_source_output() for i in op.inputs()]
        scaled = ops.scaled_dot_product_attention(
            *inputs, scale=ops.constant(np.float32(scale)), causal=bool(op.get_attributes()["causal"])
        )
        op.output(0).replace(scaled.output(0))
        count += 1
    return count


def apply_family(model: Any, reader: Any) -> list[str]:
    """Add to GenAI's graph what the file (open in ``reader``) asks beyond the layers GenAI's reader builds: Gemma 3's
    scaled embedding, GELU, norms after each block, local layers' rotary base and final logit soft cap, under the
    keys engine/openvino/convert.py writes them (its ``GEMMA``). What was added, by name."""
    import numpy as np

    from tokenwire.engine.openvino.convert import GEMMA_ACTIVATION

    arch = reader.fields["general.architecture"].contents()

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    done = []
    if (scale := field(f"{arch}.embedding_scale")) is not None:
        scale_embedding(model, float(scale))
        done.append(f"embedding scaled by {float(scale):.4g}")
    if (activation := field(GEMMA_ACTIVATION)) is not None:
        if activation != "gelu_tanh":
            raise ValueError(f"the file's {GEMMA_ACTIVATION} {activation!r} is not one tokenwire builds (gelu_tanh)")
        done.append(f"{use_gelu(model)} MLPs with tanh GELU")
    if norms := post_norms(reader):
        apply_post_norms(model, norms, float(field(f"{arch}.attention.layer_norm_rms_epsilon")))
        done.append(f"norms after attention and MLP in {len(norms)} layers")
    if (base := field(f"{arch}.rope.freq_base_swa")) is not None:
        local = [bool(w) for w in windows(reader)]
        n = int(field(f"{arch}.rope.dimension_count"))
        freqs = 1.0 / float(base) ** (np.arange(0, n, 2, dtype=np.float64) / n)
        done.append(f"rotary base {float(base):g} in {local_rotary(model, local, freqs)} windowed layers")
    if (cap := field(f"{arch}.final_logit_softcapping")) is not None:
        soft_cap_logits(model, float(cap))
        done.append(f"logits soft-capped at {float(cap):g}")
    return done


def scale_embedding(model: Any, scale: float) -> None:
    """Multiply the token embedding (the Gather of ``input_ids``) by ``scale``; the output layer, if it is the same
    matrix, keeps it unscaled (Gemma's tied embedding)."""
    import numpy as np
    import openvino.opset13 as ops

    gathers = [op for op in model.get_ordered_ops() if op.get_type_name() == "Gather" and _reads_input_ids(op)]
    if len(gathers) != 1:
        raise ValueError(f"the graph has {len(gathers)} embedding lookups of input_ids, not one")
    _insert_after(gathers[0].output(0), lambda x: ops.multiply(x, ops.constant(np.float32(scale))).output(0))


def _reads_input_ids(gather: Any) -> bool:
    node = gather.input(1).get_source_output().get_node()
    while node.get_type_name() == "Convert":
        node = node.input(0).get_source_output().get_node()
    return bool(node.get_type_name() == "Parameter" and node.get_friendly_name() == "input_ids")


def _insert_after(output: Any, make: Any) -> Any:
    """Put ``make(output)`` between ``output`` and every input it fed; the new output."""
    targets = list(output.get_target_inputs())
    made = make(output)
    for target in targets:
        target.replace_source_output(made)
    return made


def use_gelu(model: Any) -> int:
    """Replace every Swish (SiLU, the Llama MLP's gate activation) by tanh GELU (``gelu_pytorch_tanh``); how many."""
    import openvino.opset13 as ops

    swishes = [op for op in model.get_ordered_ops() if op.get_type_name() == "Swish"]
    if not swishes:
        raise ValueError("the graph has no SiLU activation to replace")
    for swish in swishes:
        gelu = ops.gelu(swish.input(0).get_source_output(), approximation_mode="tanh")
        swish.output(0).replace(gelu.output(0))
    return len(swishes)


def post_norms(reader: Any) -> list[tuple[Any, Any]]:
    """Each layer's norm weights after attention and after the MLP (llama.cpp's ``post_attention_norm`` and
    ``post_ffw_norm``), float32, in layer order; empty when the file has none."""
    import numpy as np

    found = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors if ".post_" in t.name}
    out = []
    for i in itertools.count():
        attention, mlp = found.get(f"blk.{i}.post_attention_norm.weight"), found.get(f"blk.{i}.post_ffw_norm.weight")
        if attention is None or mlp is None:
            break
        out.append((attention, mlp))
    return out


def apply_post_norms(model: Any, norms: list[tuple[Any, Any]], eps: float) -> None:
    """Normalize each layer's attention output and MLP output (RMS, times ``norms``' weights) before it is added
    to the residual stream. A layer's additions are found from its attention: the first Add after it (the
    attention's), and the Add that takes that one (the MLP's)."""
    attentions = [op for op in model.get_ordered_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    if len(attentions) != len(norms):
        raise ValueError(f"the model has {len(attentions)} attention layers and the file {len(norms)} post-norms")
    for attention, (after_attention, after_mlp) in zip(attentions, norms, strict=True):
        add, branch = _residual_add(attention)
        mlp = [c.get_node() for c in add.output(0).get_target_inputs() if c.get_node().get_type_name() == "Add"]
        if len(mlp) != 1:
            raise ValueError(f"after the attention {attention.get_friendly_name()}, no single MLP residual addition")
        _normalize_input(add.input(branch), after_attention, eps)
        branches = [
            i for i in mlp[0].inputs() if i.get_source_output().get_node().get_instance_id() != add.get_instance_id()
        ]
        if len(branches) != 1:
            raise ValueError(f"the MLP's residual addition after {attention.get_friendly_name()} is not residual + MLP")
        _normalize_input(branches[0], after_mlp, eps)


def _residual_add(attention: Any) -> tuple[Any, int]:
    """The Add that puts ``attention``'s output (through its projection) into the residual stream, and which of
    its inputs that is: the first Add down the chain of single consumers."""
    node = attention
    for _ in range(8):
        consumers = list(node.output(0).get_target_inputs())
        if len(consumers) != 1:
            break
        node = consumers[0].get_node()
        if node.get_type_name() == "Add":
            return node, consumers[0].get_index()
    raise ValueError(f"no residual addition found after the attention {attention.get_friendly_name()}")


def _normalize_input(target: Any, weight: Any, eps: float) -> None:
    """Put an RMS norm with ``weight`` on what feeds ``target`` (GenAI's own pattern, which the CPU plugin fuses)."""
    import numpy as np
    import openvino.opset13 as ops

    x = target.get_source_output()
    mean = ops.reduce_mean(
        ops.power(x, ops.constant(np.float32(2.0))), ops.constant(np.array([-1], dtype=np.int64)), keep_dims=True
    )
    inverse = ops.divide(ops.constant(np.float32(1.0)), ops.sqrt(ops.add(mean, ops.constant(np.float32(eps)))))
    normed = ops.multiply(ops.multiply(inverse, x), ops.constant(weight.reshape(1, 1, -1)))
    target.replace_source_output(normed.output(0))


def local_rotary(model: Any, local: list[bool], freqs: Any) -> int:
    """Give the layers ``local`` marks (one per attention, in order) rotary embeddings of their own frequencies
    ``freqs`` (Gemma 3's local layers: another base): the graph's one cos and sin computation is copied with
    ``freqs`` in place of its frequency constant, and those layers' rotations read the copy. How many layers."""
    if not any(local):
        return 0
    ops_by_type: dict[str, list[Any]] = {}
    for op in model.get_ordered_ops():
        ops_by_type.setdefault(op.get_type_name(), []).append(op)
    attentions = ops_by_type.get("ScaledDotProductAttention", [])
    if len(attentions) != len(local):
        raise ValueError(f"the model has {len(attentions)} attention layers and the file names {len(local)}")
    if len(ops_by_type.get("Cos", [])) != 1 or len(ops_by_type.get("Sin", [])) != 1:
        raise ValueError("the graph has not one cos and one sin computation to copy for the local layers")
    ends = [
        c.get_node()
        for trig in (ops_by_type["Cos"][0], ops_by_type["Sin"][0])
        for c in trig.output(0).get_target_inputs()
    ]
    copies = _copy_rotary(model, ends, freqs)
    count = 0
    for attention, is_local in zip(attentions, local, strict=True):
        if not is_local:
            continue
        for node in _rotation_of(attention, {e.get_instance_id() for e in ends}):
            for target in node.inputs():
                source = target.get_source_output()
                if (copy := copies.get(source.get_node().get_instance_id())) is not None:
                    target.replace_source_output(copy.output(source.get_index()))
        count += 1
    return count


def _ancestors(node: Any) -> dict[int, Any]:
    seen: dict[int, Any] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get_instance_id() in seen:
            continue
        seen[n.get_instance_id()] = n
        stack.extend(i.get_source_output().get_node() for i in n.inputs())
    return seen


def _copy_rotary(model: Any, ends: list[Any], freqs: Any) -> dict[int, Any]:
    """Copies of the nodes from the frequency constant to ``ends`` (cos and sin as the layers read them), the
    constant replaced by ``freqs``: keyed by the instance id of the node each copies. The copies are made in a
    clone of the model and grafted: each input from outside the copied part is wired to this model's node."""
    import numpy as np
    import openvino.opset13 as ops

    above: dict[int, Any] = {}
    for end in ends:
        above.update(_ancestors(end))
    constants = [
        n
        for n in above.values()
        if n.get_type_name() == "Constant"
        and n.get_output_element_type(0).is_real()
        and int(np.prod(list(n.get_output_shape(0)))) == len(freqs)
    ]
    if len(constants) != 1:
        raise ValueError(
            f"the rotary embedding has {len(constants)} frequency constants of {len(freqs)} values, not one"
        )
    frequency = constants[0]
    part = {i: n for i, n in above.items() if frequency.get_instance_id() in _ancestors(n) and n is not frequency}
    names = {n.get_friendly_name(): i for i, n in above.items()}
    if len(names) != len(above):
        raise ValueError("the rotary embedding's nodes do not have unique names")
    clone = {op.get_friendly_name(): op for op in model.clone().get_ordered_ops()}
    replacement = ops.constant(freqs.astype(np.float32).reshape(list(frequency.get_output_shape(0)))).output(0)
    copies = {i: clone[n.get_friendly_name()] for i, n in part.items()}
    for copy in copies.values():
        for target in copy.inputs():
            source = target.get_source_output()
            name = source.get_node().get_friendly_name()
            if name == frequency.get_friendly_name():
                target.replace_source_output(replacement)
            elif names.get(name) not in part:
                original = above.get(names.get(name, -1))
                if original is None:
                    raise ValueError(f"the rotary embedding reads {name}, which was not found")
                target.replace_source_output(original.output(source.get_index()))
    return copies


def _rotation_of(attention: Any, ends: set[int]) -> list[Any]:
    """The nodes that read cos or sin (``ends``: their instance ids) for ``attention``'s query and key: searched
    back from its query and key inputs, not past a matrix product (the projections) or the KV cache."""
    found, seen = [], set()
    stack = [attention.input(0).get_source_output().get_node(), attention.input(1).get_source_output().get_node()]
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_type_name() in ("MatMul", "Parameter", "ReadValue", "Constant"):
            continue
        seen.add(node.get_instance_id())
        sources = [i.get_source_output().get_node() for i in node.inputs()]
        if any(s.get_instance_id() in ends for s in sources):
            found.append(node)
        stack.extend(s for s in sources if s.get_instance_id() not in ends)
    if len(found) != 4:  # the query's and the key's product with cos and with sin
        raise ValueError(
            f"the attention {attention.get_friendly_name()} reads cos and sin in {len(found)} places, not 4"
        )
    return found


def soft_cap_logits(model: Any, cap: float) -> None:
    """``logits`` becomes ``cap * tanh(logits / cap)`` (Gemma's final logit soft cap)."""
    import numpy as np
    import openvino.opset13 as ops

    results = model.get_results()
    result = next((r for r in results if r.get_friendly_name() == "logits"), results[0])
    c = ops.constant(np.float32(cap))
    _insert_after(result.input(0).get_source_output(), lambda x: ops.multiply(ops.tanh(ops.divide(x, c)), c).output(0))


def fuse_projections(model: Any) -> int:
    """Make the products of one input with several float16 weight matrices (``x @ W.T`` for each) one product
    with the matrices stacked, split back into the same outputs: a layer's query, key and value projections, its
    gate and up. Each output row keeps its weights, so every format quantizes it as before; OpenVINO runs one
    kernel where it ran two or three. The number of groups fused."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    groups: dict[tuple[int, int], list[tuple[Any, Any]]] = {}
    for op in model.get_ordered_ops():
        source = _stackable_input(op)
        if source is None:
            continue
        convert = op.input(1).get_source_output().get_node()
        weight = convert.input(0).get_source_output().get_node() if convert.get_type_name() == "Convert" else None
        if weight is None or not _weight_converts(weight, ov):
            continue
        if len(_consumers(convert)) != 1 or len(_consumers(weight)) != 1:  # shared (tied embeddings): leave it
            continue
        groups.setdefault(source, []).append((op, weight))
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        stacked = np.concatenate([w.get_data() for _, w in members])
        _stacked_product([op for op, _ in members], ops.convert(ops.constant(stacked), ov.Type.f32).output(0))
        fused += 1
    return fused


def quantize(model: Any, fmt: str) -> int:
    """Replace every float16 weight matrix of ``model`` (a constant that a Convert feeds to MatMul or Gather) by
    ``fmt`` weights with the decompression pattern OpenVINO's CPU plugin runs compressed; the number replaced."""
    import openvino as ov
    from tqdm import tqdm

    if fmt == "none":
        return 0
    matrices = [(op, converts) for op in model.get_ordered_ops() if (converts := _weight_converts(op, ov))]
    count = 0
    for op, converts in tqdm(matrices, desc=f"quantizing to {fmt}", unit="matrix"):
        weights = op.get_data().astype("float32")
        embedding = any(c.get_type_name() == "Gather" for cv in converts for c in _consumers(cv))
        replacement = _int8_rows(weights) if fmt == "int8" or embedding else _int4_groups(weights)
        for cv in converts:
            cv.output(0).replace(replacement)
        count += 1
    return count


def _consumers(node: Any) -> list[Any]:
    return [t.get_node() for t in node.output(0).get_target_inputs()]


def _weight_converts(op: Any, ov: Any) -> list[Any]:
    """The Convert nodes that take the weight matrix ``op`` to MatMul or Gather, or [] if ``op`` is not one."""
    if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f16:
        return []
    if op.get_output_partial_shape(0).rank.get_length() != 2:
        return []
    converts = _consumers(op)
    if not converts or any(c.get_type_name() != "Convert" for c in converts):
        return []
    if all(n.get_type_name() in ("MatMul", "Gather") for c in converts for n in _consumers(c)):
        return converts
    return []


def _int8_rows(w: Any) -> Any:
    """Asymmetric int8, one scale and zero point per output row (``w``: float32, overwritten)."""
    return _int8_node(*_int8_arrays(w))


def _int8_arrays(w: Any) -> tuple[Any, Any, Any]:
    """``w`` (float32, overwritten) as uint8 codes, a zero point and a scale per row."""
    import numpy as np

    lo = np.minimum(w.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(w.max(axis=1, keepdims=True), 0.0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    np.divide(w, scale, out=w)  # in place: a 7B model's matrix is not copied three times
    np.rint(w, out=w)
    np.add(w, zero, out=w)
    np.clip(w, 0, 255, out=w)
    return w.astype(np.uint8), zero.astype(np.uint8), scale.astype(np.float16)


def _int8_node(q: Any, zero: Any, scale: Any) -> Any:
    import openvino as ov
    import openvino.opset13 as ops

    zeros = ops.convert(ops.constant(zero), ov.Type.f16)
    deq = ops.subtract(ops.convert(ops.constant(q), ov.Type.f16), zeros)
    deq = ops.multiply(deq, ops.constant(scale))
    return ops.convert(deq, ov.Type.f32).output(0)


def _int4_groups(w: Any) -> Any:
    """Symmetric int4, one scale per group of 64 inputs (32 where the width is not a multiple of 64)."""
    return _int4_node(*_int4_arrays(w))


def _int4_arrays(w: Any) -> tuple[Any, Any, tuple[int, int]]:
    import numpy as np

    rows, cols = w.shape
    group = 64 if cols % 64 == 0 else 32 if cols % 32 == 0 else cols
    g = w.reshape(rows, cols // group, group)
    scale = np.abs(g).max(axis=2, keepdims=True) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(g / scale), -8, 7).astype(np.int8)
    return q, scale.astype(np.float16), (rows, cols)


def _int4_node(q: Any, scale: Any, shape: tuple[int, int]) -> Any:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    deq = ops.convert(ops.constant(q, dtype=ov.Type.i4), ov.Type.f16)
    deq = ops.multiply(deq, ops.constant(scale))
    deq = ops.reshape(deq, ops.constant(np.array(shape, dtype=np.int64)), special_zero=False)
    return ops.convert(deq, ov.Type.f32).output(0)


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
