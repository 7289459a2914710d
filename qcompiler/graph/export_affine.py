"""Find the explicit transform nodes `AffineTransforms.install` put into an exported graph, name them, list them.

The installed hooks export as (RMSNorm / LayerNorm output `y`):

    norm → [Add pre] → Mul|MatMul inv → Mul|MatMul fwd → [Add post] → q/k/v (or gate/up, fc1) MatMul
    v_proj MatMul → [Add bias] → MatMul out      ...attention...      MatMul in → o_proj MatMul

Nodes are matched structurally from the linears the manifest already knows (never by exporter tensor names) and
renamed `{module}/affine/{role}`; their constants become `{module}.affine_{role}` when no other node reads them
(the exporter merges equal constants, e.g. identity transforms). The fold passes look the nodes up by these names.

The graph is read through onnx-ir (`to_ir`: producers and uses); the two edits, node names and constant names, are
written straight into the exporter's proto (nodes by position), which the export goes on using — no second
serialization of the model during export.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir

from qcompiler import QCompilerError
from qcompiler.graph.edit import const_input, data_input, in_module, rename_tensors, sole_user, users
from qcompiler.graph.ir_convert import to_ir


def _const_step(value: ir.Value, ops: set[str], module: str, what: str) -> ir.Node:
    node = value.producer()
    if node is None or node.op_type not in ops or const_input(node)[0] is None or not in_module(node, module):
        found = "a graph input" if node is None else f"{node.op_type} {node.name}"
        raise QCompilerError(f"export: expected the {what} of {module}'s transform ({'/'.join(sorted(ops))} with a "
                             f"constant) before {value.name}, found {found}")
    return node


def _name(node: ir.Node, module: str, role: str, names: dict[ir.Node, str], renames: dict[str, str]) -> str:
    names[node] = f"{module}/affine/{role}"
    k, _ = const_input(node)
    c = node.inputs[k].name
    if len(users(node.inputs[k])) == 1 and c not in renames.values():
        renames[c] = f"{module}.affine_{role}"
    return names[node]


def tag_transforms(proto: onnx.ModelProto, manifest: dict, transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Locate and name each transform's nodes; returns the transform entries with `"nodes": {role: node name}`."""
    graph = to_ir(proto).graph
    linears = manifest["linears"]
    names: dict[ir.Node, str] = {}  # node → its new name
    renames: dict[str, str] = {}

    def linear_node(module: str) -> ir.Node:
        entry = linears.get(module)
        if entry is None:
            raise QCompilerError(f"export: transformed linear {module} is not in the manifest")
        found = [n for n in users(graph.initializers.get(entry["weight"])) if n.op_type in ("MatMul", "Gemm")]
        if len(found) != 1:
            raise QCompilerError(f"export: expected one MatMul reading {entry['weight']}")
        return found[0]

    out = []
    for t in transforms:
        t = dict(t)
        nodes: dict[str, str] = {}
        if t["kind"] == "norm":
            norm = t["norm"]
            first = linear_node(t["linears"][0])
            x = first.inputs[0]
            for other in t["linears"][1:]:
                if linear_node(other).inputs[0] is not x:
                    raise QCompilerError(f"export: {other} does not read the same transformed input as {t['linears'][0]}")
            mm = {"MatMul"} if t["matrix"] else {"Mul"}
            chain = ([("post", {"Add"})] if t["shift"] else []) + [("fwd", mm), ("inv", mm)]
            chain += [("pre", {"Add"})] if t["shift"] else []
            for role, ops in chain:
                node = _const_step(x, ops, norm, role)
                nodes[role] = _name(node, norm, role, names, renames)
                x = data_input(node)
            t["norm_output"] = x.name
        elif t["kind"] == "heads":
            v_node = linear_node(t["v"])
            y = v_node.outputs[0]
            bias_add = sole_user(y, ("Add",))
            if bias_add is not None and linears[t["v"]].get("bias") in [i.name for i in bias_add.inputs if i]:
                y = bias_add.outputs[0]
            node = sole_user(y, ("MatMul",))
            if node is None or const_input(node)[0] != 1 or not in_module(node, t["v"]):
                raise QCompilerError(f"export: expected {t['v']}'s output transform (MatMul with a constant) after {y.name}")
            nodes["out"] = _name(node, t["v"], "out", names, renames)
            o_node = linear_node(t["o"])
            node = _const_step(o_node.inputs[0], {"MatMul"}, t["o"], "in")
            nodes["in"] = _name(node, t["o"], "in", names, renames)
        else:
            raise QCompilerError(f"export: unknown transform kind {t['kind']!r}")
        t["nodes"] = nodes
        out.append(t)
    for k, node in enumerate(graph):
        if node in names:
            proto.graph.node[k].name = names[node]
    rename_tensors(proto, renames)
    return out
