"""Building `qcompiler::SpQRMatMul` nodes and their initializers from a `SpQRWeight` (one place for names)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.graph.format import ACTIVATIONS, DOMAIN, INPUT_NAMES, OP_TYPE, SpQRWeight


def spqr_node(
    weight: SpQRWeight,
    *,
    x: str,
    y: str,
    prefix: str,
    bias_dtype=np.float32,
    doc: Optional[str] = None,
    accuracy_level: int = 0,
    activation: str = "",
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A `SpQRMatMul` node reading `x`, writing `y`, with initializers named `{prefix}/{input_name}`.

    `prefix` is the module path (e.g. `model.layers.3.mlp.down_proj`), so Netron shows readable names.
    `accuracy_level` 4 lets the CPU kernel quantize X to int8 (docs/spqr-format.md); 0 (the default) writes no
    attribute. `activation` (`format.ACTIVATIONS`; "" writes no attribute): "silu_mul" makes Y the SwiGLU of the product
    (`weight`'s rows: the gate half, then the up half).
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    inits: list[onnx.TensorProto] = []
    inputs = [x]
    for name, arr in zip(INPUT_NAMES[1:], weight.inputs(bias_dtype=bias_dtype)):
        if arr is None:
            inputs.append("")
            continue
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name=f"{prefix}/{name}")
        inits.append(t)
        inputs.append(t.name)
    while inputs and inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(
        OP_TYPE,
        inputs,
        [y],
        name=f"{prefix}/{OP_TYPE}",
        domain=DOMAIN,
        doc_string=doc or describe(weight),
        **weight.attributes(),
        **({"accuracy_level": accuracy_level} if accuracy_level else {}),
        **({"activation": activation} if activation else {}),
    )
    return node, inits


def describe(weight: SpQRWeight) -> str:
    """One-line human summary used as the node's doc_string (shown by Netron)."""
    parts = [f"W[{weight.N}x{weight.K}] {weight.bits}-bit, group {weight.group_size}"]
    if weight.stat_bits:
        parts.append(f"{weight.stat_bits}-bit stats over {weight.stat_group_size} rows")
    else:
        parts.append("fp16 stats")
    if weight.nnz:
        parts.append(f"{weight.nnz} outliers ({100.0 * weight.nnz / (weight.N * weight.K):.2f}%)")
    if weight.perm is not None:
        parts.append("act_order perm")
    parts.append(f"{weight.avg_bits():.3f} bits/param")
    return ", ".join(parts)


def weight_from_arrays(attrs: Mapping[str, Any], arrays: Mapping[str, Optional[np.ndarray]]) -> SpQRWeight:
    """A `SpQRWeight` from a SpQRMatMul node's attributes and its inputs after X (keyed by `INPUT_NAMES[1:]`; None
    for an omitted optional input), whichever graph representation they were read from."""
    arrays = dict(arrays)
    bias = arrays.pop("bias", None)
    return SpQRWeight(
        K=int(attrs["K"]),
        N=int(attrs["N"]),
        bits=int(attrs["bits"]),
        group_size=int(attrs["group_size"]),
        stat_bits=int(attrs["stat_bits"]),
        stat_group_size=int(attrs["stat_group_size"]),
        bias=None if bias is None else bias.astype(np.float32),
        **arrays,
    )


def weight_from_node(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> SpQRWeight:
    """Read a `SpQRMatMul` node and its initializers back into a `SpQRWeight` (inverse of `spqr_node`)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arrays: dict[str, Optional[np.ndarray]] = {}
    for name, inp in zip(INPUT_NAMES[1:], list(node.input[1:]) + [""] * (len(INPUT_NAMES) - len(node.input))):
        arrays[name] = numpy_helper.to_array(initializers[inp]) if inp else None
    return weight_from_arrays(attrs, arrays)


#: node metadata key of a SpQRMatMul that serves several linears (passes/fuse_sibling_linears.py): a JSON list of
#: `[module path, rows]`, in output order
PARTS_KEY = "qcompiler.parts"


def node_parts(node: onnx.NodeProto) -> list[tuple[str, int]]:
    """`(module path, output rows)` of each linear a SpQRMatMul node computes, in output order: one for a node of
    `spqr_node`, several for a fused node (its `qcompiler.parts` metadata)."""
    for prop in node.metadata_props:
        if prop.key == PARTS_KEY:
            return [(str(m), int(n)) for m, n in json.loads(prop.value)]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [(node.name.rsplit("/", 1)[0], int(attrs["N"]))]


def weights_from_node(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> list[tuple[str, SpQRWeight]]:
    """`(module path, SpQRWeight)` of each linear a SpQRMatMul node computes (a fused node split back)."""
    parts = node_parts(node)
    weight = weight_from_node(node, initializers)
    if len(parts) == 1:
        return [(parts[0][0], weight)]
    return list(zip([m for m, _ in parts], weight.split([n for _, n in parts])))
