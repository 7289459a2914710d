"""`fuse-rotary`: the exporter's rotary position embedding as one `com.microsoft::RotaryEmbedding` node.

Hugging Face's `apply_rotary_pos_emb` exports, for q and k of every layer, as
`x · Unsqueeze(Cos(C)) + Concat(−Slice(x, h:), Slice(x, :h)) · Unsqueeze(Sin(C))` with `C = Concat(f, f)` and
`f = position_ids · inv_freq` (per position, `h` = half the head size): seven nodes per tensor that ONNX Runtime's
optimiser leaves as seven kernels (SmolLM2-135M: 420 of a decode step's ~1400). `RotaryEmbedding` (non-interleaved,
4-D input `[batch, heads, seq, head]`, in the stock ONNX Runtime CPU and CUDA EPs) computes the same from `position_ids`
and tables `cos(f)`, `sin(f)` of the first `max_positions` positions, which this pass evaluates from the graph's own
`f` subgraph (so whatever the rope variant baked into it, the table holds the graph's values).

Matched only where everything is as above: the two `Mul`s share `x`, the `Slice`s split its last axis at one `h`, both
`Concat`s are on the last axis, `C` concatenates one `f` with itself, and `f` depends on nothing but one graph input
(the position ids) through per-position ops (Unsqueeze, Cast, Mul, Div, Add, Sub). Anything else — partial rotary,
interleaved layouts, fp16 graphs (their Cast sits between Cos and Unsqueeze), attention scaling folded into the tables —
stays as exported. Values: the tables are the graph's fp32 values, the rotation is rounded differently (≤ 1 ulp of
each product). Positions past `max_positions` become an error of the node in ONNX Runtime 1.31 (1.21 does not check
the bound; the unfused graph would extrapolate).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from qcompiler.graph.edit import STANDARD, const, fresh_name, is_const, produced, set_const

from .base import Pass, PassResult

MS_DOMAIN = "com.microsoft"
_PER_POSITION = {"Unsqueeze", "Cast", "Mul", "Div", "Add", "Sub", "Constant"}


def _ints(value: Optional[ir.Value]) -> Optional[list[int]]:
    """An integer constant (initializer or Constant node) as a flat list, else None."""
    v = const(value)
    c = produced(value, "Constant") if value is not None and v is None else None
    if c is not None and c.attributes and next(iter(c.attributes)) == "value":
        v = c.attributes["value"].as_tensor().numpy()
    return None if v is None or v.dtype.kind not in "iu" else [int(i) for i in v.reshape(-1)]


def _last_axis(node: ir.Node) -> bool:
    axis = node.attributes.get("axis")
    return (axis.value if axis is not None else None) in (-1, 3)


def _input(node: ir.Node, k: int) -> Optional[ir.Value]:
    return node.inputs[k] if len(node.inputs) > k else None


def _half_slice(node: Optional[ir.Node], x: ir.Value) -> Optional[tuple[int, int]]:
    """(start, end) of a Slice of x's last axis with step 1, else None."""
    if node is None or node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    starts, ends, axes = _ints(node.inputs[1]), _ints(node.inputs[2]), _ints(node.inputs[3])
    steps = _ints(node.inputs[4]) if _input(node, 4) is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, 3) or steps != [1]:
        return None
    return starts[0], ends[0]


def _unsqueezed(value: Optional[ir.Value], op: str) -> Optional[ir.Value]:
    """The input C of `Unsqueeze(op(C), axes=[1])`, else None."""
    u = produced(value, "Unsqueeze")
    if u is None or _ints(_input(u, 1)) != [1]:
        return None
    t = produced(u.inputs[0], op)
    return t.inputs[0] if t is not None else None


def _match(add: ir.Node) -> Optional[tuple[ir.Value, ir.Value]]:
    """(x, f) of a rotary `Add`, else None."""
    muls = [produced(i, "Mul") for i in add.inputs]
    if len(muls) != 2 or None in muls:
        return None
    for cos_mul, rot_mul in (muls, muls[::-1]):
        for x, cos_u in (cos_mul.inputs, cos_mul.inputs[::-1]):
            c = _unsqueezed(cos_u, "Cos")
            if c is None:
                continue
            for rot, sin_u in (rot_mul.inputs, rot_mul.inputs[::-1]):
                cat = produced(rot, "Concat")
                if _unsqueezed(sin_u, "Sin") is not c or cat is None or len(cat.inputs) != 2 or not _last_axis(cat):
                    continue
                neg = produced(cat.inputs[0], "Neg")
                high = _half_slice(produced(neg.inputs[0], "Slice"), x) if neg is not None else None
                low = _half_slice(produced(cat.inputs[1], "Slice"), x)
                if high is None or low is None or low[0] != 0 or low[1] <= 0 or high[0] != low[1]:
                    continue
                if high[1] != 2 * low[1] and high[1] < np.iinfo(np.int32).max:
                    continue  # the upper slice must run to the end of the head (2 h): full rotation
                cc = produced(c, "Concat")
                if cc is None or len(cc.inputs) != 2 or cc.inputs[0] is not cc.inputs[1] or not _last_axis(cc):
                    continue
                return x, cc.inputs[0]
    return None


def _position_table(graph: ir.Graph, f: ir.Value, positions: int) -> Optional[tuple[ir.Value, np.ndarray]]:
    """(position input, f evaluated at positions 0 .. positions-1 as [positions, h]) if f is per-position."""
    import onnxruntime as ort

    graph_inputs = set(graph.inputs)
    nodes, inputs, stack, seen = set(), set(), [f], set()
    while stack:
        value = stack.pop()
        if value is None or value in seen or is_const(value):
            continue
        seen.add(value)
        if value in graph_inputs:
            inputs.add(value)
            continue
        n = value.producer()
        if n is None or n.op_type not in _PER_POSITION or n.domain not in STANDARD:
            return None
        nodes.add(n)
        stack.extend(n.inputs)
    if len(inputs) != 1:
        return None
    (pos,) = inputs
    chosen = [n for n in graph if n in nodes]
    inits = dict.fromkeys(i for n in chosen for i in n.inputs if is_const(i))
    sub = helper.make_graph(
        [ir.serde.serialize_node(n) for n in chosen], "f",
        [helper.make_tensor_value_info(pos.name, onnx.TensorProto.INT64, [1, positions])],
        [helper.make_tensor_value_info(f.name, onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(const(v), v.name) for v in inits])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        table = sess.run(None, {pos.name: np.arange(positions, dtype=np.int64)[None]})[0]
    except Exception:  # noqa: BLE001 - not evaluable this way: leave the subgraph as exported
        return None
    if table.dtype != np.float32 or table.ndim != 3 or table.shape[:2] != (1, positions):
        return None
    return pos, table[0]


class FuseRotary(Pass):
    """Replace each matched rotary embedding by `com.microsoft::RotaryEmbedding` with cos/sin tables.

    Args:
        max_positions: rows of the tables (the model's `max_position_embeddings`).
    """

    name = "fuse-rotary"
    preserves_outputs = True

    def __init__(self, max_positions: int):
        if max_positions < 1:
            raise ValueError(f"max_positions must be positive, got {max_positions}")
        self.max_positions = max_positions

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        tables: dict[ir.Value, Optional[tuple[ir.Value, ir.Value, ir.Value]]] = {}  # f → (positions, cos, sin)
        fused, notes = 0, []
        for add in list(graph):
            if add.op_type != "Add" or add.domain not in STANDARD:
                continue
            m = _match(add)
            if m is None:
                continue
            x, f = m
            if f not in tables:
                evaluated = _position_table(graph, f, self.max_positions)
                tables[f] = None
                if evaluated is None:
                    notes.append(f"{add.name}: rotary pattern, but its angles are not a per-position function of "
                                 "one input; left as exported")
                else:
                    pos, angles = evaluated
                    tables[f] = (pos, set_const(graph, fresh_name(graph, "rotary_cos_cache"), np.cos(angles)),
                                 set_const(graph, fresh_name(graph, "rotary_sin_cache"), np.sin(angles)))
            if tables[f] is None:
                continue
            # the Add becomes the RotaryEmbedding in place (its output and metadata stay; the rest goes dead)
            add.op_type, add.domain, add.name = "RotaryEmbedding", MS_DOMAIN, f"{add.name}/RotaryEmbedding"
            add.resize_inputs(4)
            for k, value in enumerate([x, *tables[f]]):
                add.replace_input_with(k, value)
            add.attributes["interleaved"] = ir.AttrInt64("interleaved", 0)
            fused += 1
        if fused and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return PassResult(model, modified=fused > 0, notes=notes,
                          counts={"fused": fused, "tables": sum(t is not None for t in tables.values())})

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        fused = [n for n in model.graph if n.op_type == "RotaryEmbedding" and n.domain == MS_DOMAIN]
        assert len(fused) >= result.counts["fused"], f"{result.counts['fused']} fused, {len(fused)} nodes"
        for n in fused:
            for value in n.inputs[2:4]:
                dims = list(value.const_value.shape) if is_const(value) else None
                assert dims is not None and dims[0] == self.max_positions, f"{n.name}: table {value.name} {dims}"
