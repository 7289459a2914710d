"""`fold-affine-into-linear`: fold the weight side of each AffineQuant transform into the adjacent linears.

- norm transforms (after `fold-affine-into-norm`): `[Add {norm}/affine/leftover] → Mul|MatMul fwd → [Add post]` in
  front of q/k/v (gate/up, fc1) becomes part of each linear: `W' = fwd W`, `b' = b + ((leftover) fwd + post) W`;
  a linear without bias gets one (`{module}.bias`, an `Add` the replace-linear pass folds into SpQRMatMul).
- value → output transforms: `MatMul {v}/affine/out` after v_proj folds into v_proj (`W B`, `b B`) and
  `MatMul {o}/affine/in` before o_proj folds into o_proj (`A W`).

The math is `qcompiler.fold.fold_linear_input` / `fold_linear_output`, the functions the PyTorch merge uses. Run
`fold-affine-into-norm` first: this pass refuses a norm transform whose norm side is still in the graph.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import onnx
import torch

from qcompiler.fold import fold_linear_input, fold_linear_output

from .base import Pass, PassError, PassResult
from .graph import GraphIndex, make_node


class FoldAffineIntoLinear(Pass):
    """Fold `manifest["affine"]` transforms into the linears' weights and biases (see the module docstring)."""

    name = "fold-affine-into-linear"
    preserves_outputs: ClassVar[bool] = True

    def __init__(self, manifest: dict):
        self.manifest = manifest

    def requires(self, model: onnx.ModelProto) -> None:
        for t in self.manifest.get("affine", []):
            if t["kind"] == "norm" and not t.get("folded_norm") and not t.get("folded_linear"):
                raise PassError(f"{t['norm']}: run fold-affine-into-norm first")

    def call(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model)
        counts = {"norm_transforms": 0, "head_transforms": 0, "weights": 0, "biases_added": 0}
        for t in self.manifest.get("affine", []):
            if t.get("folded_linear"):
                continue
            roles = t["nodes"]
            if t["kind"] == "norm":
                fwd = index.node(roles["fwd"])
                post = index.node(roles["post"]) if "post" in roles else None
                left = index.node(roles["leftover"]) if "leftover" in roles else None
                Q = _t(index.const_of(fwd))
                post_v = None if post is None else _t(index.const_of(post))
                left_v = None if left is None else _t(index.const_of(left))
                source = index.data_input(left if left is not None else fwd)
                out = (post if post is not None else fwd).output[0]
                linears = t["linears"]
                readers = index.users(out)
                mm = [self._linear(index, m) for m in linears]
                if sorted(id(n) for n in readers) != sorted(id(n) for n in mm):
                    raise PassError(f"{t['norm']}: transformed input feeds {[n.name for n in readers]}, "
                                    f"expected exactly the linears {linears}")
                for module in linears:
                    self._fold(index, module, lambda W, b: fold_linear_input(W, b, Q, pre=left_v, post=post_v),
                               counts)
                for role, node in (("post", post), ("fwd", fwd), ("leftover", left)):
                    if node is not None:
                        index.bypass(node, source if role == "leftover" else index.data_input(node))
                        roles.pop(role)
                counts["norm_transforms"] += 1
            elif t["kind"] == "heads":
                out_node, in_node = index.node(roles["out"]), index.node(roles["in"])
                B = _t(index.const_of(out_node))
                A = _t(index.const_of(in_node))
                self._fold(index, t["v"], lambda W, b: fold_linear_output(W, b, B), counts)
                self._fold(index, t["o"], lambda W, b: fold_linear_input(W, b, A), counts)
                index.bypass(out_node, index.data_input(out_node))
                index.bypass(in_node, index.data_input(in_node))
                roles.pop("out")
                roles.pop("in")
                counts["head_transforms"] += 1
            t["folded_linear"] = True
        counts["removed_nodes"] = index.commit()
        modified = counts["norm_transforms"] + counts["head_transforms"] > 0
        return PassResult(model=model, modified=modified, counts=counts)

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        left = [n.name for n in model.graph.node if "/affine/" in n.name
                and not n.name.endswith(("/affine/matrix", "/affine/shift"))]
        if left:
            raise PassError(f"transform nodes left after folding: {left[:5]}")

    def _linear(self, index: GraphIndex, module: str) -> onnx.NodeProto:
        entry = self.manifest["linears"].get(module)
        if entry is None:
            raise PassError(f"{module} is not in the export manifest")
        users = [n for n in index.users(entry["weight"]) if n.op_type in ("MatMul", "Gemm")]
        if len(users) != 1 or users[0].input[1] != entry["weight"]:
            raise PassError(f"{module}: expected one MatMul/Gemm reading {entry['weight']}")
        return users[0]

    def _fold(self, index: GraphIndex, module: str, fn, counts: dict) -> None:
        entry = self.manifest["linears"][module]
        node = self._linear(index, module)
        if len(index.users(entry["weight"])) != 1:
            raise PassError(f"{module}: weight {entry['weight']} is shared; cannot fold a transform into it")
        nxk = entry["weight_layout"] == "NxK"  # Gemm transB=1 holds the PyTorch layout
        W = _t(index.const(entry["weight"]))
        bias_name: Optional[str] = entry.get("bias")
        b = None if bias_name is None else _t(index.const(bias_name))
        new_w, new_b = fn(W.T if nxk else W, b)
        index.set_const(entry["weight"], (new_w.T if nxk else new_w).contiguous().numpy(), like=entry["weight"])
        counts["weights"] += 1
        if new_b is None:
            return
        if bias_name is not None:
            if len(index.users(bias_name)) != 1:
                raise PassError(f"{module}: bias {bias_name} is shared; cannot fold a transform into it")
            index.set_const(bias_name, new_b.numpy(), like=entry["weight"])
            return
        name = index.set_const(index.fresh_name(f"{module}.bias"), new_b.numpy(), like=entry["weight"])
        if node.op_type == "Gemm":
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
            index.refresh()
            entry["bias"] = name
            counts["biases_added"] += 1
            return
        add = make_node("Add", [node.output[0], name], index.fresh_name(f"{module}/bias_out"), f"{module}/bias",
                        module)
        index.insert_after(node.output[0], add)
        entry["bias"] = name
        counts["biases_added"] += 1


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))
