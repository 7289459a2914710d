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
from onnx import helper, numpy_helper

from qcompiler.external import tensor_array

from .base import Pass, PassResult

MS_DOMAIN = "com.microsoft"
_PER_POSITION = {"Unsqueeze", "Cast", "Mul", "Div", "Add", "Sub", "Constant"}


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}

    def node(self, name: str, op: str) -> Optional[onnx.NodeProto]:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def const(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return tensor_array(self.inits[name])
        n = self.node(name, "Constant")
        if n is not None and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def ints(self, name: str) -> Optional[list[int]]:
        v = self.const(name) if name else None
        return None if v is None or v.dtype.kind not in "iu" else [int(i) for i in v.reshape(-1)]


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _last_axis(node: onnx.NodeProto) -> bool:
    return _attr(node, "axis") in (-1, 3)


def _half_slice(g: _Graph, node: Optional[onnx.NodeProto], x: str) -> Optional[tuple[int, int]]:
    """(start, end) of a Slice of x's last axis with step 1, else None."""
    if node is None or node.input[0] != x or len(node.input) < 4:
        return None
    starts, ends, axes = g.ints(node.input[1]), g.ints(node.input[2]), g.ints(node.input[3])
    steps = g.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, 3) or steps != [1]:
        return None
    return starts[0], ends[0]


def _unsqueezed(g: _Graph, name: str, op: str) -> Optional[str]:
    """The input C of `Unsqueeze(op(C), axes=[1])`, else None."""
    u = g.node(name, "Unsqueeze")
    if u is None or g.ints(u.input[1] if len(u.input) > 1 else "") != [1]:
        return None
    t = g.node(u.input[0], op)
    return t.input[0] if t is not None else None


def _match(g: _Graph, add: onnx.NodeProto) -> Optional[tuple[str, str]]:
    """(x, f) of a rotary `Add`, else None."""
    muls = [g.node(i, "Mul") for i in add.input]
    if len(muls) != 2 or None in muls:
        return None
    for cos_mul, rot_mul in (muls, muls[::-1]):
        for x, cos_u in (cos_mul.input, cos_mul.input[::-1]):
            c = _unsqueezed(g, cos_u, "Cos")
            if c is None:
                continue
            for rot, sin_u in (rot_mul.input, rot_mul.input[::-1]):
                cat = g.node(rot, "Concat")
                if _unsqueezed(g, sin_u, "Sin") != c or cat is None or len(cat.input) != 2 or not _last_axis(cat):
                    continue
                neg = g.node(cat.input[0], "Neg")
                high = _half_slice(g, g.node(neg.input[0], "Slice"), x) if neg is not None else None
                low = _half_slice(g, g.node(cat.input[1], "Slice"), x)
                if high is None or low is None or low[0] != 0 or low[1] <= 0 or high[0] != low[1]:
                    continue
                if high[1] != 2 * low[1] and high[1] < np.iinfo(np.int32).max:
                    continue  # the upper slice must run to the end of the head (2 h): full rotation
                cc = g.node(c, "Concat")
                if cc is None or len(cc.input) != 2 or cc.input[0] != cc.input[1] or not _last_axis(cc):
                    continue
                return x, cc.input[0]
    return None


def _position_table(g: _Graph, f: str, positions: int) -> Optional[tuple[str, np.ndarray]]:
    """(position input, f evaluated at positions 0 .. positions-1 as [positions, h]) if f is per-position."""
    import onnxruntime as ort

    nodes, inputs, stack, seen = [], set(), [f], set()
    while stack:
        name = stack.pop()
        if name in seen or name in g.inits or not name:
            continue
        seen.add(name)
        if name in g.inputs:
            inputs.add(name)
            continue
        n = g.producer.get(name)
        if n is None or n.op_type not in _PER_POSITION or n.domain not in ("", "ai.onnx"):
            return None
        nodes.append(n)
        stack.extend(n.input)
    if len(inputs) != 1:
        return None
    (pos,) = inputs
    inits = [g.inits[i] for n in nodes for i in n.input if i in g.inits]
    sub = helper.make_graph(
        list(reversed(nodes)), "f", [helper.make_tensor_value_info(pos, onnx.TensorProto.INT64, [1, positions])],
        [helper.make_tensor_value_info(f, onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(tensor_array(t), t.name) for t in {t.name: t for t in inits}.values()])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        table = sess.run(None, {pos: np.arange(positions, dtype=np.int64)[None]})[0]
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

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = _Graph(model.graph)
        tables: dict[str, Optional[tuple[str, str, str]]] = {}  # f → (position input, cos table, sin table)
        replace: dict[str, onnx.NodeProto] = {}  # Add output → its RotaryEmbedding
        notes = []
        for add in model.graph.node:
            if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                continue
            m = _match(g, add)
            if m is None:
                continue
            x, f = m
            if f not in tables:
                evaluated = _position_table(g, f, self.max_positions)
                if evaluated is None:
                    notes.append(f"{add.name}: rotary pattern, but its angles are not a per-position function of "
                                 "one input; left as exported")
                    tables[f] = None
                else:
                    pos, angles = evaluated
                    i = sum(t is not None for t in tables.values())
                    names = (f"rotary_cos_cache_{i}", f"rotary_sin_cache_{i}")
                    model.graph.initializer.extend([numpy_helper.from_array(np.cos(angles).astype(np.float32), names[0]),
                                                    numpy_helper.from_array(np.sin(angles).astype(np.float32), names[1])])
                    tables[f] = (pos, *names)
            if tables[f] is None:
                continue
            pos, cos_name, sin_name = tables[f]
            node = helper.make_node("RotaryEmbedding", [x, pos, cos_name, sin_name], list(add.output),
                                    name=f"{add.name}/RotaryEmbedding", domain=MS_DOMAIN, interleaved=0)
            node.metadata_props.extend(add.metadata_props)
            replace[add.output[0]] = node
        if not replace:
            return PassResult(model, modified=False, counts={"fused": 0, "tables": 0}, notes=notes)
        nodes = [replace.get(n.output[0], n) if n.op_type == "Add" and n.output else n for n in model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return PassResult(model, modified=True, counts={"fused": len(replace), "tables": len(
            [t for t in tables.values() if t is not None])}, notes=notes)

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        g = _Graph(model.graph)
        fused = [n for n in model.graph.node if n.op_type == "RotaryEmbedding" and n.domain == MS_DOMAIN]
        assert len(fused) >= result.counts["fused"], f"{result.counts['fused']} fused, {len(fused)} nodes"
        for n in fused:
            for name in n.input[2:4]:
                dims = list(g.inits[name].dims) if name in g.inits else None
                assert dims is not None and dims[0] == self.max_positions, f"{n.name}: table {name} {dims}"
