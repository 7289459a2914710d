"""`fuse-silu-mul`: a SwiGLU MLP's gate/up SpQRMatMul, its Split and `silu(gate) · up` become one SpQRMatMul.

After `fuse-sibling-linears`, a LLaMA-style MLP reads `Split(SpQRMatMul(x)) → gate, up`, then `gate · Sigmoid(gate)`
(the exporter's silu) and `· up`: four small nodes per layer around the kernel, each a pass over the activations and
a fixed per-node cost that shows at decode sizes (bench/results/node-profile-2026-12-06.md: Split, QuickGelu and
Mul took 0.85 ms of a 9.8 ms two-thread step on SmolLM2). The node's `activation = "silu_mul"` attribute
(docs/spqr-format.md) has the kernel apply it to its own product instead: Y = silu(Z[..., :N/2]) · Z[..., N/2:].

Matched: the Split's two outputs are equal halves along the last axis; the gate half feeds exactly a Sigmoid and the
Mul of the gate by it; that product and the up half feed exactly one Mul; none of them is a graph output. Other
activations (Gemma's tanh GELU) keep their nodes. Equal to the unfused graph up to the rounding of the exponential
(the kernels' e^x is within a few ulp of expf), hence `preserves_outputs`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir

from qcompiler.graph.edit import const, remove_unused_initializers, users
from qcompiler.graph.format import DOMAIN, OP_TYPE

from .base import Pass, PassResult

ACTIVATION = "silu_mul"


def _other(node: ir.Node, value: ir.Value) -> Optional[ir.Value]:
    """The input of a two-input `node` that is not `value` (None unless `value` is exactly one of them)."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value and b is not value else a if b is value and a is not value else None


def _match(node: ir.Node) -> Optional[tuple[ir.Node, list[ir.Node]]]:
    """`(final Mul, nodes to remove)` when `node`'s output is the gate/up pair of a silu-gated product."""
    y = node.outputs[0]
    if y.is_graph_output() or len(users(y)) != 1:
        return None
    (split,) = users(y)
    if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.outputs) != 2:
        return None
    n = node.attributes["N"].value
    axis = split.attributes.get("axis")
    rank = len(y.shape) if y.shape is not None else None
    if axis is None or axis.value not in (-1, *((rank - 1,) if rank else ())) or n % 2:
        return None
    sizes = const(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is None or [int(s) for s in np.asarray(sizes).ravel()] != [n // 2, n // 2]:
        return None
    gate, up = split.outputs
    if any(v.is_graph_output() for v in (gate, up)):
        return None
    gate_users = users(gate)
    sigmoid = next((u for u in gate_users if u.op_type == "Sigmoid" and u.domain in ("", "ai.onnx")), None)
    if sigmoid is None or len(gate_users) != 2:
        return None
    silu = next(u for u in gate_users if u is not sigmoid)
    if silu.op_type != "Mul" or silu.domain not in ("", "ai.onnx") or _other(silu, gate) is not sigmoid.outputs[0]:
        return None
    if users(sigmoid.outputs[0]) != [silu] or sigmoid.outputs[0].is_graph_output():
        return None
    act = silu.outputs[0]
    if len(users(act)) != 1 or act.is_graph_output():
        return None
    (mul,) = users(act)
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or _other(mul, act) is not up \
            or users(up) != [mul]:
        return None
    return mul, [split, sigmoid, silu, mul]


class FuseSiluMul(Pass):
    """SpQRMatMul → Split → silu(gate) · up  ⇒  SpQRMatMul(activation="silu_mul")."""

    name = "fuse-silu-mul"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        fused = 0
        for node in list(graph):
            if node.op_type != OP_TYPE or node.domain != DOMAIN or "activation" in node.attributes:
                continue
            found = _match(node)
            if found is None:
                continue
            mul, dead = found
            out = mul.outputs[0]
            y = node.outputs[0]
            y.shape, y.type = out.shape, out.type
            node.attributes["activation"] = ir.AttrString("activation", ACTIVATION)
            if node.doc_string:
                node.doc_string = node.doc_string.replace(" (split after)", "") + "; Y = silu(gate rows) · up rows"
            name = out.name
            out.replace_all_uses_with(y, replace_graph_outputs=True)
            graph.remove(dead, safe=True)
            y.name = name  # the MLP's product keeps its name
            fused += 1
        if fused:
            remove_unused_initializers(graph)  # the Splits' sizes
        return PassResult(model, modified=fused > 0, counts={"fused": fused})

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        for node in model.graph:
            attr = node.attributes.get("activation") if node.op_type == OP_TYPE and node.domain == DOMAIN else None
            if attr is None:
                continue
            assert attr.value == ACTIVATION, f"{node.name}: activation {attr.value!r}"
            n = node.attributes["N"].value
            shape = node.outputs[0].shape
            assert n % 2 == 0, f"{node.name}: odd N with {ACTIVATION}"
            if shape is not None and isinstance(shape[-1], int):
                assert shape[-1] == n // 2, f"{node.name}: output {shape} with N={n}"
