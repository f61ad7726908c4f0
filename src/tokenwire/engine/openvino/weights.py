"""The GGUF file's own weights in OpenVINO GenAI's graph, decoded exactly, and every weight matrix quantized here.

GenAI reads a file's blocks only near (a Q4_1 block's float minimum as a rounded 4-bit zero point; a Q4_K weight
4-5% off), so each weight of its graph is told apart by its values and replaced by the file's tensor decoded by the
``gguf`` package (:func:`take_file_weights`), projections of one input fused into one product
(:func:`fuse_projections`), float32 constants the IR save rounded put back (:func:`restore_float32`), and every
matrix quantized in numpy (:func:`quantize`: int8 a scale and zero point per row, int4 a scale per group, or
float16). engine/openvino/ir.py runs these in order.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tokenwire.engine.openvino.formats import (
    consumers,
    formatted_arrays,
    formatted_node,
    stackable_input,
    stacked_product,
)

log = logging.getLogger(__name__)


class WeightsNotFound(ValueError):
    """A weight of GenAI's graph matches no tensor of the file, or more than one that differ."""


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
    weights = _graph_weights(model, reader)
    groups: dict[Any, list[tuple[Any, Any, Any]]] = {}
    for chain, (output, t, order) in weights.items():
        users = [i.get_node() for i in output.get_target_inputs()]
        source = stackable_input(users[0]) if len(users) == 1 else None
        # alone, unless it is one of the products of one input
        groups.setdefault(chain if source is None else ("input", *source), []).append((output, t, order))
    _replace(list(groups.values()), fmt)
    return len(weights)


def _graph_weights(model: Any, reader: Any) -> dict[tuple[int, int], tuple[Any, Any, Any]]:
    """Every weight GenAI built from the file's blocks, by its chain's output: that output, the file's tensor it
    is, and the row order it takes there (WeightsNotFound for one that matches no tensor)."""
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
    return weights


def _replace(pending: list[list[tuple[Any, Any, Any]]], fmt: str) -> None:
    """Put each group's weights, decoded exactly and in ``fmt``, into the graph (a group of several as one stacked
    product); two groups are decoded at a time, off the graph, so at most two are in memory beside it."""
    import numpy as np

    def prepared(members: list[tuple[Any, Any, Any]]) -> Any:  # numpy only (off the graph): two run at once
        decoded = [_exact(t)[order] for _, t, order in members]
        users = [i.get_node().get_type_name() for out, _, _ in members for i in out.get_target_inputs()]
        return formatted_arrays(np.concatenate(decoded) if len(decoded) > 1 else decoded[0], fmt, "Gather" in users)

    with ThreadPoolExecutor(max_workers=2) as pool:
        running = deque(pool.submit(prepared, members) for members in pending[:2])  # two groups in memory at most
        for i, members in enumerate(pending):
            weight = formatted_node(running.popleft().result())
            if i + 2 < len(pending):
                running.append(pool.submit(prepared, pending[i + 2]))
            if len(members) == 1:
                members[0][0].replace(weight)
            else:
                stacked_product([next(iter(out.get_target_inputs())).get_node() for out, _, _ in members], weight)


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
        plain = 1.0 / float(base.contents()) ** (np.arange(0, n, 2, dtype=np.float64) / n)
        freqs, divisors = plain, rope_divisors(reader)
        if divisors is not None and divisors.shape == freqs.shape:
            freqs = freqs / divisors  # GenAI's reader builds plain RoPE: Llama 3's scaling is put in here
        rotary = plain.astype(np.float16).tobytes()
        candidates[rotary] = [freqs.astype(np.float32)]
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
        users = consumers(op)
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
