"""`fold-affine-into-linear`: fold the weight side of each AffineQuant transform into the adjacent linears.

- norm transforms (after `fold-affine-into-norm`): `[Add {norm}/affine/leftover] → Mul|MatMul fwd → [Add post]` in
  front of q/k/v (gate/up, fc1) becomes part of each linear: `W' = fwd W`, `b' = b + ((leftover) fwd + post) W`;
  a linear without bias gets one (`{module}.bias`, an `Add` the replace-linear pass folds into SpQRMatMul).
- value → output transforms: `MatMul {v}/affine/out` after v_proj folds into v_proj (`W B`, `b B`) and
  `MatMul {o}/affine/in` before o_proj folds into o_proj (`A W`).

The math is `qcompiler.graph.fold.fold_linear_input` / `fold_linear_output`, the functions the PyTorch merge uses. Run
`fold-affine-into-norm` first: this pass refuses a norm transform whose norm side is still in the graph.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import onnx_ir as ir
import torch

from qcompiler.graph import edit
from qcompiler.graph.edit import const, const_of, data_input, fresh_name, make_node, set_const, users
from qcompiler.graph.fold import fold_linear_input, fold_linear_output

from .base import Pass, PassError, PassResult


class FoldAffineIntoLinear(Pass):
    """Fold `manifest["affine"]` transforms into the linears' weights and biases (see the module docstring)."""

    name = "fold-affine-into-linear"
    preserves_outputs: ClassVar[bool] = True

    def __init__(self, manifest: dict):
        self.manifest = manifest

    def requires(self, model: ir.Model) -> None:
        for t in self.manifest.get("affine", []):
            if t["kind"] == "norm" and not t.get("folded_norm") and not t.get("folded_linear"):
                raise PassError(f"{t['norm']}: run fold-affine-into-norm first")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        counts = {"norm_transforms": 0, "head_transforms": 0, "weights": 0, "biases_added": 0}
        removed = 0
        for t in self.manifest.get("affine", []):
            if t.get("folded_linear"):
                continue
            roles = t["nodes"]
            if t["kind"] == "norm":
                fwd = edit.find_node(graph, roles["fwd"])
                post = edit.find_node(graph, roles["post"]) if "post" in roles else None
                left = edit.find_node(graph, roles["leftover"]) if "leftover" in roles else None
                Q = _t(const_of(fwd))
                post_v = None if post is None else _t(const_of(post))
                left_v = None if left is None else _t(const_of(left))
                source = data_input(left if left is not None else fwd)
                out = (post if post is not None else fwd).outputs[0]
                linears = t["linears"]
                readers = users(out)
                mm = [self._linear(graph, m) for m in linears]
                if sorted(id(n) for n in readers) != sorted(id(n) for n in mm):
                    raise PassError(f"{t['norm']}: transformed input feeds {[n.name for n in readers]}, "
                                    f"expected exactly the linears {linears}")
                for module in linears:
                    self._fold(graph, module, lambda W, b: fold_linear_input(W, b, Q, pre=left_v, post=post_v),
                               counts)
                for role, node in (("post", post), ("fwd", fwd), ("leftover", left)):
                    if node is not None:
                        edit.bypass(graph, node, source if role == "leftover" else data_input(node))
                        removed += 1
                        roles.pop(role)
                counts["norm_transforms"] += 1
            elif t["kind"] == "heads":
                out_node, in_node = edit.find_node(graph, roles["out"]), edit.find_node(graph, roles["in"])
                B = _t(const_of(out_node))
                A = _t(const_of(in_node))
                self._fold(graph, t["v"], lambda W, b: fold_linear_output(W, b, B), counts)
                self._fold(graph, t["o"], lambda W, b: fold_linear_input(W, b, A), counts)
                edit.bypass(graph, out_node, data_input(out_node))
                edit.bypass(graph, in_node, data_input(in_node))
                removed += 2
                roles.pop("out")
                roles.pop("in")
                counts["head_transforms"] += 1
            t["folded_linear"] = True
        edit.commit(graph)
        counts["removed_nodes"] = removed
        modified = counts["norm_transforms"] + counts["head_transforms"] > 0
        return PassResult(model=model, modified=modified, counts=counts)

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        left = [n.name for n in model.graph if "/affine/" in n.name
                and not n.name.endswith(("/affine/matrix", "/affine/shift"))]
        if left:
            raise PassError(f"transform nodes left after folding: {left[:5]}")

    def _linear(self, graph: ir.Graph, module: str) -> ir.Node:
        entry = self.manifest["linears"].get(module)
        if entry is None:
            raise PassError(f"{module} is not in the export manifest")
        weight = graph.initializers.get(entry["weight"])
        found = [n for n in users(weight) if n.op_type in ("MatMul", "Gemm")]
        if len(found) != 1 or found[0].inputs[1] is not weight:
            raise PassError(f"{module}: expected one MatMul/Gemm reading {entry['weight']}")
        return found[0]

    def _fold(self, graph: ir.Graph, module: str, fn, counts: dict) -> None:
        entry = self.manifest["linears"][module]
        node = self._linear(graph, module)
        weight = graph.initializers[entry["weight"]]
        if len(users(weight)) != 1:
            raise PassError(f"{module}: weight {entry['weight']} is shared; cannot fold a transform into it")
        nxk = entry["weight_layout"] == "NxK"  # Gemm transB=1 holds the PyTorch layout
        W = _t(const(weight))
        bias_name: Optional[str] = entry.get("bias")
        b = None if bias_name is None else _t(const(graph.initializers[bias_name]))
        new_w, new_b = fn(W.T if nxk else W, b)
        set_const(graph, entry["weight"], (new_w.T if nxk else new_w).contiguous().numpy(), like=weight)
        counts["weights"] += 1
        if new_b is None:
            return
        if bias_name is not None:
            if len(users(graph.initializers[bias_name])) != 1:
                raise PassError(f"{module}: bias {bias_name} is shared; cannot fold a transform into it")
            set_const(graph, bias_name, new_b.numpy(), like=weight)
            return
        bias = set_const(graph, fresh_name(graph, f"{module}.bias"), new_b.numpy(), like=weight)
        if node.op_type == "Gemm":
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, bias)
            entry["bias"] = bias.name
            counts["biases_added"] += 1
            return
        add = make_node("Add", [node.outputs[0], bias], fresh_name(graph, f"{module}/bias_out"), f"{module}/bias",
                        module)
        edit.insert_after(graph, node.outputs[0], add)
        entry["bias"] = bias.name
        counts["biases_added"] += 1


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))
