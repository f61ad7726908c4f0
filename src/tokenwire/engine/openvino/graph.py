"""What a GGUF file asks of the model beyond the layers OpenVINO GenAI builds, built into its graph.

A sliding attention window (:func:`apply_windows`, in the form OpenVINO's continuous-batching transformation reads
as a window for its paged attention), an attention scale (:func:`apply_scale`: Phi-3's LongRoPE, Gemma's
``query_pre_attn_scalar``), and Gemma 3's additions (:func:`apply_family`: the embedding scale, tanh GELU, a norm
after attention and after the MLP, the local layers' rotary base, a final logit soft cap). engine/openvino/ir.py
applies them after the weights.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

log = logging.getLogger(__name__)


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
