"""Find the explicit transform nodes `AffineTransforms.install` put into an exported graph, name them, list them.

The installed hooks export as (RMSNorm / LayerNorm output `y`):

    norm → [Add pre] → Mul|MatMul inv → Mul|MatMul fwd → [Add post] → q/k/v (or gate/up, fc1) MatMul
    v_proj MatMul → [Add bias] → MatMul out      ...attention...      MatMul in → o_proj MatMul

Nodes are matched structurally from the linears the manifest already knows (never by exporter tensor names) and
renamed `{module}/affine/{role}`; their constants become `{module}.affine_{role}` when no other node reads them
(the exporter merges equal constants, e.g. identity transforms). The fold passes look the nodes up by these names.
"""

from __future__ import annotations

from typing import Any

import onnx

from . import QCompilerError
from .passes.graph import GraphIndex, in_module

_BINARY = {"Mul", "MatMul", "Add"}


def _const_step(index: GraphIndex, tensor: str, ops: set[str], module: str, what: str) -> onnx.NodeProto:
    node = index.producer.get(tensor)
    if node is None or node.op_type not in ops or index.const_input(node)[0] is None or not in_module(node, module):
        found = "a graph input" if node is None else f"{node.op_type} {node.name}"
        raise QCompilerError(f"export: expected the {what} of {module}'s transform ({'/'.join(sorted(ops))} with a "
                             f"constant) before {tensor}, found {found}")
    return node


def _name(index: GraphIndex, node: onnx.NodeProto, module: str, role: str, renames: dict[str, str]) -> str:
    node.name = f"{module}/affine/{role}"
    k, _ = index.const_input(node)
    const = node.input[k]
    if len(index.users(const)) == 1 and const not in renames.values():
        renames[const] = f"{module}.affine_{role}"
    return node.name


def tag_transforms(proto: onnx.ModelProto, manifest: dict, transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Locate and name each transform's nodes; returns the transform entries with `"nodes": {role: node name}`."""
    index = GraphIndex(proto)
    linears = manifest["linears"]
    renames: dict[str, str] = {}

    def linear_node(module: str) -> onnx.NodeProto:
        entry = linears.get(module)
        if entry is None:
            raise QCompilerError(f"export: transformed linear {module} is not in the manifest")
        users = [n for n in index.users(entry["weight"]) if n.op_type in ("MatMul", "Gemm")]
        if len(users) != 1:
            raise QCompilerError(f"export: expected one MatMul reading {entry['weight']}")
        return users[0]

    out = []
    for t in transforms:
        t = dict(t)
        nodes: dict[str, str] = {}
        if t["kind"] == "norm":
            norm = t["norm"]
            first = linear_node(t["linears"][0])
            x = first.input[0]
            for other in t["linears"][1:]:
                if linear_node(other).input[0] != x:
                    raise QCompilerError(f"export: {other} does not read the same transformed input as {t['linears'][0]}")
            mm = {"MatMul"} if t["matrix"] else {"Mul"}
            chain = ([("post", {"Add"})] if t["shift"] else []) + [("fwd", mm), ("inv", mm)]
            chain += [("pre", {"Add"})] if t["shift"] else []
            for role, ops in chain:
                node = _const_step(index, x, ops, norm, role)
                nodes[role] = _name(index, node, norm, role, renames)
                x = index.data_input(node)
            t["norm_output"] = x
        elif t["kind"] == "heads":
            v_node = linear_node(t["v"])
            y = v_node.output[0]
            bias_add = index.sole_user(y, ("Add",))
            if bias_add is not None and linears[t["v"]].get("bias") in bias_add.input:
                y = bias_add.output[0]
            node = index.sole_user(y, ("MatMul",))
            if node is None or index.const_input(node)[0] != 1 or not in_module(node, t["v"]):
                raise QCompilerError(f"export: expected {t['v']}'s output transform (MatMul with a constant) after {y}")
            nodes["out"] = _name(index, node, t["v"], "out", renames)
            o_node = linear_node(t["o"])
            node = _const_step(index, o_node.input[0], {"MatMul"}, t["o"], "in")
            nodes["in"] = _name(index, node, t["o"], "in", renames)
        else:
            raise QCompilerError(f"export: unknown transform kind {t['kind']!r}")
        t["nodes"] = nodes
        out.append(t)
    from .export import _rename_tensors

    _rename_tensors(proto, renames)
    return out
