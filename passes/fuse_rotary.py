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

from .base import Pass, PassResult
from .graph import GraphIndex

MS_DOMAIN = "com.microsoft"
_PER_POSITION = {"Unsqueeze", "Cast", "Mul", "Div", "Add", "Sub", "Constant"}


def _produced(g: GraphIndex, name: str, op: str) -> Optional[onnx.NodeProto]:
    """The standard-domain `op` node producing `name`, else None."""
    n = g.producer.get(name)
    return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None


def _ints(g: GraphIndex, name: str) -> Optional[list[int]]:
    """An integer constant (initializer or Constant node) as a flat list, else None."""
    v = g.const(name) if name else None
    c = _produced(g, name, "Constant") if name and v is None else None
    if c is not None and c.attribute and c.attribute[0].name == "value":
        v = numpy_helper.to_array(c.attribute[0].t)
    return None if v is None or v.dtype.kind not in "iu" else [int(i) for i in v.reshape(-1)]


def _last_axis(node: onnx.NodeProto) -> bool:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None) in (-1, 3)


def _half_slice(g: GraphIndex, node: Optional[onnx.NodeProto], x: str) -> Optional[tuple[int, int]]:
    """(start, end) of a Slice of x's last axis with step 1, else None."""
    if node is None or node.input[0] != x or len(node.input) < 4:
        return None
    starts, ends, axes = _ints(g, node.input[1]), _ints(g, node.input[2]), _ints(g, node.input[3])
    steps = _ints(g, node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, 3) or steps != [1]:
        return None
    return starts[0], ends[0]


def _unsqueezed(g: GraphIndex, name: str, op: str) -> Optional[str]:
    """The input C of `Unsqueeze(op(C), axes=[1])`, else None."""
    u = _produced(g, name, "Unsqueeze")
    if u is None or _ints(g, u.input[1] if len(u.input) > 1 else "") != [1]:
        return None
    t = _produced(g, u.input[0], op)
    return t.input[0] if t is not None else None


def _match(g: GraphIndex, add: onnx.NodeProto) -> Optional[tuple[str, str]]:
    """(x, f) of a rotary `Add`, else None."""
    muls = [_produced(g, i, "Mul") for i in add.input]
    if len(muls) != 2 or None in muls:
        return None
    for cos_mul, rot_mul in (muls, muls[::-1]):
        for x, cos_u in (cos_mul.input, cos_mul.input[::-1]):
            c = _unsqueezed(g, cos_u, "Cos")
            if c is None:
                continue
            for rot, sin_u in (rot_mul.input, rot_mul.input[::-1]):
                cat = _produced(g, rot, "Concat")
                if _unsqueezed(g, sin_u, "Sin") != c or cat is None or len(cat.input) != 2 or not _last_axis(cat):
                    continue
                neg = _produced(g, cat.input[0], "Neg")
                high = _half_slice(g, _produced(g, neg.input[0], "Slice"), x) if neg is not None else None
                low = _half_slice(g, _produced(g, cat.input[1], "Slice"), x)
                if high is None or low is None or low[0] != 0 or low[1] <= 0 or high[0] != low[1]:
                    continue
                if high[1] != 2 * low[1] and high[1] < np.iinfo(np.int32).max:
                    continue  # the upper slice must run to the end of the head (2 h): full rotation
                cc = _produced(g, c, "Concat")
                if cc is None or len(cc.input) != 2 or cc.input[0] != cc.input[1] or not _last_axis(cc):
                    continue
                return x, cc.input[0]
    return None


def _position_table(g: GraphIndex, f: str, positions: int) -> Optional[tuple[str, np.ndarray]]:
    """(position input, f evaluated at positions 0 .. positions-1 as [positions, h]) if f is per-position."""
    import onnxruntime as ort

    graph_inputs = {i.name for i in g.graph.input}
    nodes, inputs, stack, seen = [], set(), [f], set()
    while stack:
        name = stack.pop()
        if name in seen or name in g.inits or not name:
            continue
        seen.add(name)
        if name in graph_inputs:
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
    inits = [i for n in nodes for i in n.input if i in g.inits]
    chosen = {id(n) for n in nodes}  # (`nodes` keeps the wrappers, and so their ids, alive)
    sub = helper.make_graph(
        [n for n in g.graph.node if id(n) in chosen], "f", [helper.make_tensor_value_info(pos, onnx.TensorProto.INT64, [1, positions])],
        [helper.make_tensor_value_info(f, onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(g.const(name), name) for name in dict.fromkeys(inits)])
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
        g = GraphIndex(model)
        tables: dict[str, Optional[tuple[str, str, str]]] = {}  # f → (position input, cos table, sin table)
        fused, notes = 0, []
        for add in model.graph.node:
            if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                continue
            m = _match(g, add)
            if m is None:
                continue
            x, f = m
            if f not in tables:
                evaluated = _position_table(g, f, self.max_positions)
                tables[f] = None
                if evaluated is None:
                    notes.append(f"{add.name}: rotary pattern, but its angles are not a per-position function of "
                                 "one input; left as exported")
                else:
                    pos, angles = evaluated
                    tables[f] = (pos, g.set_const(g.fresh_name("rotary_cos_cache"), np.cos(angles)),
                                 g.set_const(g.fresh_name("rotary_sin_cache"), np.sin(angles)))
            if tables[f] is None:
                continue
            # the Add becomes the RotaryEmbedding in place (its output and metadata stay; the rest goes dead)
            add.op_type, add.domain, add.name = "RotaryEmbedding", MS_DOMAIN, f"{add.name}/RotaryEmbedding"
            del add.input[:]
            add.input.extend([x, *tables[f]])
            add.attribute.append(helper.make_attribute("interleaved", 0))
            fused += 1
        if fused and not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return PassResult(model, modified=fused > 0, notes=notes,
                          counts={"fused": fused, "tables": sum(t is not None for t in tables.values())})

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        g = GraphIndex(model)
        fused = [n for n in model.graph.node if n.op_type == "RotaryEmbedding" and n.domain == MS_DOMAIN]
        assert len(fused) >= result.counts["fused"], f"{result.counts['fused']} fused, {len(fused)} nodes"
        for n in fused:
            for name in n.input[2:4]:
                dims = list(g.inits[name].dims) if name in g.inits else None
                assert dims is not None and dims[0] == self.max_positions, f"{n.name}: table {name} {dims}"
