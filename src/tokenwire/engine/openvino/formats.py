"""The weight formats of the IR: projections of one input fused into one product, and every matrix in float16,
int8 (a scale and zero point per output row) or int4 (a scale per group of inputs; embeddings in int8), made in
numpy (:func:`quantize`; weights.py formats the file's own weights the same way as it takes them)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def formatted_arrays(w: Any, fmt: str, embedding: bool) -> tuple[str, tuple[Any, ...]]:
    """The weight matrix ``w`` (float32, consumed) in ``fmt`` as :func:`quantize` writes it, as numpy arrays."""
    import numpy as np

    if fmt == "none":
        return "none", (w.astype(np.float16),)
    if fmt == "int8" or embedding:
        return "int8", _int8_arrays(w)
    return "int4", _int4_arrays(w)


def formatted_node(prepared: tuple[str, tuple[Any, ...]]) -> Any:
    """The graph's float32 weight from :func:`formatted_arrays`' arrays."""
    import openvino as ov
    import openvino.opset13 as ops

    kind, arrays = prepared
    if kind == "none":
        return ops.convert(ops.constant(arrays[0]), ov.Type.f32).output(0)
    return _int8_node(*arrays) if kind == "int8" else _int4_node(*arrays)


def stackable_input(op: Any) -> tuple[int, int] | None:
    """The input (node id, output index) of ``op`` if it is a product ``x @ W.T`` that can share one stacked weight
    with the other products of ``x`` (:func:`stacked_product`), else None."""
    if op.get_type_name() != "MatMul" or not op.get_attributes().get("transpose_b"):
        return None
    if op.get_attributes().get("transpose_a"):
        return None
    source = op.input(0).get_source_output()
    return source.get_node().get_instance_id(), source.get_index()


def stacked_product(products: list[Any], weight: Any) -> None:
    """Replace ``products`` (MatMuls of one input, each with its own weight) by one product with ``weight``, their
    weights stacked in their order, split back into their outputs."""
    import numpy as np
    import openvino.opset13 as ops

    product = ops.matmul(products[0].input(0).get_source_output(), weight, False, True)
    rows = np.array([int(p.input(1).get_source_output().get_shape()[0]) for p in products], dtype=np.int64)
    split = ops.variadic_split(product, ops.constant(np.int64(-1)), ops.constant(rows))
    for i, p in enumerate(products):
        p.output(0).replace(split.output(i))


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
        source = stackable_input(op)
        if source is None:
            continue
        convert = op.input(1).get_source_output().get_node()
        weight = convert.input(0).get_source_output().get_node() if convert.get_type_name() == "Convert" else None
        if weight is None or not weight_converts(weight, ov):
            continue
        if len(consumers(convert)) != 1 or len(consumers(weight)) != 1:  # shared (tied embeddings): leave it
            continue
        groups.setdefault(source, []).append((op, weight))
    fused = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        stacked = np.concatenate([w.get_data() for _, w in members])
        stacked_product([op for op, _ in members], ops.convert(ops.constant(stacked), ov.Type.f32).output(0))
        fused += 1
    return fused


def quantize(model: Any, fmt: str) -> int:
    """Replace every float16 weight matrix of ``model`` (a constant that a Convert feeds to MatMul or Gather) by
    ``fmt`` weights with the decompression pattern OpenVINO's CPU plugin runs compressed; the number replaced."""
    import openvino as ov
    from tqdm import tqdm

    if fmt == "none":
        return 0
    matrices = [(op, converts) for op in model.get_ordered_ops() if (converts := weight_converts(op, ov))]
    count = 0
    for op, converts in tqdm(matrices, desc=f"quantizing to {fmt}", unit="matrix"):
        weights = op.get_data().astype("float32")
        embedding = any(c.get_type_name() == "Gather" for cv in converts for c in consumers(cv))
        replacement = int8_rows(weights) if fmt == "int8" or embedding else _int4_groups(weights)
        for cv in converts:
            cv.output(0).replace(replacement)
        count += 1
    return count


def consumers(node: Any) -> list[Any]:
    return [t.get_node() for t in node.output(0).get_target_inputs()]


def weight_converts(op: Any, ov: Any) -> list[Any]:
    """The Convert nodes that take the weight matrix ``op`` to MatMul or Gather, or [] if ``op`` is not one."""
    if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f16:
        return []
    if op.get_output_partial_shape(0).rank.get_length() != 2:
        return []
    converts = consumers(op)
    if not converts or any(c.get_type_name() != "Convert" for c in converts):
        return []
    if all(n.get_type_name() in ("MatMul", "Gather") for c in converts for n in consumers(c)):
        return converts
    return []


def int8_rows(w: Any) -> Any:
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
