"""`quantize-activations`: dynamic per-token fake quantization in front of each quantized linear (w4a4).

Inserts one `qcompiler.functions::ActQuantPerToken{bits}` node (a model-local ONNX function, qcompiler/actquant.py)
per distinct input of the `SpQRMatMul` nodes of the listed modules (q/k/v share their input, so they share one node,
with the same values as quantizing it three times). Run it after `replace-linear`.
"""

from __future__ import annotations

from typing import Iterable

import onnx
from onnx import helper

from qcompiler.actquant import FUNCTION_DOMAIN, act_quant_function, function_name
from qcompiler.format import DOMAIN, OP_TYPE

from .base import Pass, PassError, PassResult
from .graph import GraphIndex


class QuantizeActivations(Pass):
    """Quantize the inputs of the SpQRMatMul nodes of `modules` to `bits` bits, per token."""

    name = "quantize-activations"

    def __init__(self, modules: Iterable[str], bits: int):
        self.modules = set(modules)
        self.bits = bits

    def call(self, model: onnx.ModelProto) -> PassResult:
        index = GraphIndex(model)
        fname = function_name(self.bits)
        inserted: dict[str, str] = {}
        for node in list(model.graph.node):
            if node.op_type != OP_TYPE or node.domain != DOMAIN or node.name.rsplit("/", 1)[0] not in self.modules:
                continue
            x = node.input[0]
            if x not in inserted:
                module = node.name.rsplit("/", 1)[0]
                out = index.fresh_name(f"{module}/act_quant_out")
                q = helper.make_node(fname, [x], [out], name=f"{module}/act_quant", domain=FUNCTION_DOMAIN)
                model.graph.node.append(q)
                inserted[x] = out
            node.input[0] = inserted[x]
        quantized = sum(1 for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN
                        and n.name.rsplit("/", 1)[0] in self.modules)
        if quantized != len(self.modules):
            raise PassError(f"{quantized} SpQRMatMul nodes for {len(self.modules)} modules (run after replace-linear)")
        if inserted:
            if not any(f.name == fname and f.domain == FUNCTION_DOMAIN for f in model.functions):
                model.functions.append(act_quant_function(self.bits))
            if not any(o.domain == FUNCTION_DOMAIN for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
            index.refresh()
            index.commit()  # topological order
        return PassResult(model=model, modified=bool(inserted), counts={"act_quant_nodes": len(inserted)})
