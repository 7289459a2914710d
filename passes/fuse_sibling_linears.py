"""`fuse-sibling-linears`: SpQRMatMul nodes that read the same input become one node and a Split.

q/k/v read the same normed hidden state, gate/up too. GPTQ-style quantizers derive a linear's input permutation
(act-order) from its input's Hessian, so siblings share it, and their rows can be stored as one weight
(`SpQRWeight.concat`): one kernel call reads X, permutes and (with int8 activations) quantizes it once instead of
three times, and each call's fixed cost is paid once (bench/results/peers-2026-12-06-fused.md measures exports
with the pass against the earlier peers-2026-12-06.md without it).

Exact: every output row is computed as before (same codes, statistics, outliers, bias), so the Split's outputs
equal the old nodes' outputs. The fused node is named after its parts (`model.layers.0.self_attn.q_proj+k_proj+v_proj`)
and lists them in its `qcompiler.parts` metadata (`qcompiler.graph.onnx_op.node_parts`), which is how
`torch_model_from_folder` and `qcompiler inspect` split it back.

Siblings are fused when their attributes (K, bits, group sizes, statistics width, accuracy level), permutation and
bias presence agree and every part but the last is a whole number of statistics groups; otherwise they stay, with a
note.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import onnx_ir as ir

from qcompiler.graph.edit import copy_value_info, is_const, node_from_proto
from qcompiler.graph.format import DOMAIN, INPUT_NAMES, OP_TYPE, SpQRWeight
from qcompiler.graph.onnx_op import PARTS_KEY, describe, spqr_node, weight_from_arrays

from .base import Pass, PassError, PassResult

_KEY_ATTRS = ("K", "bits", "group_size", "stat_bits", "stat_group_size", "accuracy_level")


def _weight(node: ir.Node) -> Optional[SpQRWeight]:
    """The node's weight from its initializers (None when an input is fed at run time)."""
    arrays: dict[str, Optional[np.ndarray]] = {}
    for name, value in zip(INPUT_NAMES[1:], list(node.inputs[1:]) + [None] * len(INPUT_NAMES)):
        if value is None:
            arrays[name] = None
        elif not is_const(value):
            return None
        else:
            arrays[name] = value.const_value.numpy()
    return weight_from_arrays({k: a.value for k, a in node.attributes.items()}, arrays)


def _fused_prefix(modules: list[str]) -> str:
    """`a.b.q_proj`, `a.b.k_proj` → `a.b.q_proj+k_proj` (the common parent, then the leaves joined by `+`)."""
    parents = {m.rpartition(".")[0] for m in modules}
    if len(parents) != 1:
        return "+".join(modules)
    parent = parents.pop()
    return (f"{parent}." if parent else "") + "+".join(m.rpartition(".")[2] for m in modules)


class FuseSiblingLinears(Pass):
    """Fuse SpQRMatMul nodes reading the same input into one SpQRMatMul + Split."""

    name = "fuse-sibling-linears"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if node.op_type != OP_TYPE or node.domain != DOMAIN or node.inputs[0] is None:
                continue
            if PARTS_KEY in node.metadata_props:  # already fused
                continue
            attrs = {k: a.value for k, a in node.attributes.items()}
            bias = node.inputs[9] if len(node.inputs) > 9 else None
            key = (id(node.inputs[0]), *(attrs.get(k, 0) for k in _KEY_ATTRS),
                   None if bias is None else bias.dtype)
            groups.setdefault(key, []).append(node)
        fused, notes = 0, []
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            weights = [_weight(n) for n in nodes]
            modules = [n.name.rsplit("/", 1)[0] for n in nodes]
            if any(w is None for w in weights):
                notes.append(f"{', '.join(modules)}: weights fed at run time, not fused")
                continue
            reason = SpQRWeight.concat_refusal(weights)
            if reason is not None:
                notes.append(f"{', '.join(modules)}: not fused ({reason})")
                continue
            self._fuse(graph, nodes, weights, modules)
            fused += len(nodes)
        return PassResult(model, modified=fused > 0, counts={"fused": fused}, notes=notes)

    @staticmethod
    def _fuse(graph: ir.Graph, nodes: list[ir.Node], weights: list[SpQRWeight], modules: list[str]) -> None:
        first = nodes[0]
        x = first.inputs[0]
        weight = SpQRWeight.concat(weights)
        prefix = _fused_prefix(modules)
        bias = first.inputs[9] if len(first.inputs) > 9 else None
        bias_dtype = np.float32 if bias is None else bias.const_value.numpy().dtype
        level = first.attributes.get("accuracy_level")
        parts = ", ".join(f"{m.rpartition('.')[2]} {w.N}" for m, w in zip(modules, weights))
        proto, tensors = spqr_node(weight, x=x.name, y=f"{prefix}/{OP_TYPE}/Y", prefix=prefix,
                                   bias_dtype=bias_dtype, accuracy_level=level.value if level is not None else 0,
                                   doc=f"{describe(weight)}; rows: {parts} (split after)")
        proto.metadata_props.add(key=PARTS_KEY, value=json.dumps([[m, w.N] for m, w in zip(modules, weights)]))
        if "namespace" in first.metadata_props:
            proto.metadata_props.add(key="namespace", value=first.metadata_props["namespace"])
        values = {}
        for t in tensors:
            if t.name in graph.initializers:
                raise PassError(f"{prefix}: initializer {t.name} exists already")
            values[t.name] = ir.Value(name=t.name, const_value=ir.serde.deserialize_tensor(t))
            graph.register_initializer(values[t.name])
        matmul = node_from_proto(proto, [x, *(values.get(n) for n in proto.input[1:])])
        sizes = ir.Value(name=f"{prefix}/split_sizes",
                         const_value=ir.tensor(np.array([w.N for w in weights], np.int64)))
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                        num_outputs=len(nodes), name=f"{prefix}/Split")
        graph.insert_before(first, [matmul, split])
        old = [n.outputs[0] for n in nodes]
        for value, new in zip(old, split.outputs):
            copy_value_info(value, new)
            if value.shape is not None:  # the fused output: the same dims with the rows summed
                dims = list(value.shape)
                dims[-1] = weight.N
                matmul.outputs[0].shape = ir.Shape(dims)
                matmul.outputs[0].type = value.type
            value.replace_all_uses_with(new, replace_graph_outputs=True)
        names = [v.name for v in old]
        graph.remove(nodes, safe=True)
        for new, name in zip(split.outputs, names):  # the parts keep their output names
            new.name = name

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        for node in model.graph:
            if node.op_type == OP_TYPE and node.domain == DOMAIN and PARTS_KEY in node.metadata_props:
                parts = json.loads(node.metadata_props[PARTS_KEY])
                assert sum(n for _, n in parts) == node.attributes["N"].value, f"{node.name}: parts vs N"
                (split,) = [u.node for u in node.outputs[0].uses()]
                assert split.op_type == "Split" and len(split.outputs) == len(parts), f"{node.name}: no Split"
