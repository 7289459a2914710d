"""`fuse-skip-norm`: a residual Add and the RMSNorm reading it as one `com.microsoft::SkipSimplifiedLayerNormalization`.

After `rsqrt-as-div` each RMSNorm of the export reads `r = a + b` (the residual stream plus a block's output) as

    Pow(r, 2) → ReduceMean(last axis) → Add(ε) → Sqrt → Div(r, ·) → Mul(weight)

ONNX Runtime fuses the norm into SimplifiedLayerNormalization but leaves the Add in front of it as its own kernel
(its sum also feeds the next residual Add, which its SkipLayerNorm fusion does not take). SkipSimplifiedLayerNormalization
(CPU and CUDA EPs) computes both from `a` and `b` in one pass: output 0 is the normed value, output 3 the sum, which
the other readers of `r` get. SmolLM2-135M: 59 of its 61 norms (the first reads the embedding, not an Add), 59 kernels
fewer per step.

Matched only in exactly that form, with a constant ε and a constant 1-D weight of the last axis' size and nothing else
reading the norm's intermediate values; fp16 graphs (the norm upcast with Casts) stay as exported. Values: the fused
kernel sums and normalizes in fp32 with its own rounding order (within the export tolerance).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from qcompiler.graph.edit import STANDARD, const, sole_user, users

from .base import Pass, PassResult

MS_DOMAIN = "com.microsoft"


def _other(node: ir.Node, value: ir.Value) -> Optional[ir.Value]:
    """The input of a two-input node that is not `value` (None if `value` is not exactly one of them)."""
    ins = list(node.inputs)
    if len(ins) != 2 or ins.count(value) != 1:
        return None
    return ins[1] if ins[0] is value else ins[0]


def _norm(r: ir.Value) -> Optional[tuple[list[ir.Node], ir.Node, ir.Value, float]]:
    """(the norm's nodes, its final Mul, the weight, ε) of an RMSNorm reading `r`, else None."""
    pow_ = next((u for u in users(r) if u.op_type == "Pow" and u.domain in STANDARD and u.inputs[0] is r), None)
    if pow_ is None or const(pow_.inputs[1]) is None or float(np.asarray(const(pow_.inputs[1])).reshape(-1)[0]) != 2:
        return None
    mean = sole_user(pow_.outputs[0], ("ReduceMean",))
    if mean is None or len(mean.inputs) < 2 or const(mean.inputs[1]) is None \
            or list(np.asarray(const(mean.inputs[1])).reshape(-1)) not in ([-1], [len(r.shape or ()) - 1]):
        return None
    if mean.attributes.get("keepdims") is not None and not mean.attributes["keepdims"].value:
        return None
    add = sole_user(mean.outputs[0], ("Add",))
    eps = _other(add, mean.outputs[0]) if add is not None else None
    if eps is None or const(eps) is None or np.asarray(const(eps)).size != 1:
        return None
    sqrt = sole_user(add.outputs[0], ("Sqrt",))
    div = sole_user(sqrt.outputs[0], ("Div",)) if sqrt is not None else None
    if div is None or div.inputs[0] is not r or div.inputs[1] is not sqrt.outputs[0]:
        return None
    mul = sole_user(div.outputs[0], ("Mul",))
    weight = _other(mul, div.outputs[0]) if mul is not None else None
    w = const(weight) if weight is not None else None
    hidden = r.shape[-1] if r.shape is not None and len(r.shape) else None
    if w is None or w.ndim != 1 or not isinstance(hidden, int) or w.shape[0] != hidden:
        return None
    if any(n.domain not in STANDARD for n in (mean, add, sqrt, div, mul)):
        return None
    return [pow_, mean, add, sqrt, div, mul], mul, weight, float(np.asarray(const(eps)).reshape(-1)[0])


class FuseSkipNorm(Pass):
    """Fuse each `RMSNorm(a + b)` into SkipSimplifiedLayerNormalization(a, b)."""

    name = "fuse-skip-norm"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        fused = 0
        for add in list(graph):
            if add.op_type != "Add" or add.domain not in STANDARD or len(add.inputs) != 2:
                continue
            r = add.outputs[0]
            a, b = add.inputs
            if r.is_graph_output() or a is None or b is None or a.shape is None or b.shape is None \
                    or list(a.shape) != list(b.shape) or r.dtype != ir.DataType.FLOAT:
                continue
            norm = _norm(r)
            if norm is None:
                continue
            nodes, mul, weight, eps = norm
            if mul.outputs[0].is_graph_output():
                continue
            fused_node = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [a, b, weight],
                                 attributes=[ir.AttrFloat32("epsilon", eps)], num_outputs=4,
                                 name=f"{mul.name}/SkipSimplifiedLayerNormalization")
            out, _, _, total = fused_node.outputs
            out.name, total.name = f"{mul.outputs[0].name}/skip_norm", f"{r.name}/skip_sum"
            for new, old in ((out, mul.outputs[0]), (total, r)):
                new.type, new.shape = old.type, old.shape
            graph.insert_before(add, fused_node)
            for unused in fused_node.outputs[1:3]:  # mean and inverse std: not requested (else computed and stored)
                unused.name = ""
            mul.outputs[0].replace_all_uses_with(out)
            r.replace_all_uses_with(total)  # the next residual Add (the norm's own nodes go dead)
            for node in reversed(nodes):
                graph.remove(node, safe=True)
            graph.remove(add, safe=True)
            fused += 1
        if fused and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return PassResult(model, modified=fused > 0, counts={"fused": fused})
