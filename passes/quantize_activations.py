"""`quantize-activations`: dynamic per-token fake quantization in front of each quantized linear (w4a4).

Inserts one `qcompiler.functions::ActQuantPerToken{bits}` node (a model-local ONNX function, qcompiler/graph/actquant.py)
per distinct input of the `SpQRMatMul` nodes of the listed modules (q/k/v share their input, so they share one node,
with the same values as quantizing it three times). Run it after `replace-linear`.
"""

from __future__ import annotations

from typing import Iterable

import onnx_ir as ir

from qcompiler.graph.actquant import FUNCTION_DOMAIN, act_quant_function, function_name
from qcompiler.graph.edit import commit, fresh_name, make_node
from qcompiler.graph.format import DOMAIN, OP_TYPE

from .base import Pass, PassError, PassResult


class QuantizeActivations(Pass):
    """Quantize the inputs of the SpQRMatMul nodes of `modules` to `bits` bits, per token."""

    name = "quantize-activations"

    def __init__(self, modules: Iterable[str], bits: int):
        self.modules = set(modules)
        self.bits = bits

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        fname = function_name(self.bits)
        inserted: dict[ir.Value, ir.Value] = {}
        for node in list(graph):
            if node.op_type != OP_TYPE or node.domain != DOMAIN or node.name.rsplit("/", 1)[0] not in self.modules:
                continue
            x = node.inputs[0]
            if x not in inserted:
                module = node.name.rsplit("/", 1)[0]
                q = make_node(fname, [x], fresh_name(graph, f"{module}/act_quant_out"), f"{module}/act_quant",
                              domain=FUNCTION_DOMAIN)
                graph.append(q)
                inserted[x] = q.outputs[0]
            node.replace_input_with(0, inserted[x])
        quantized = sum(1 for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN
                        and n.name.rsplit("/", 1)[0] in self.modules)
        if quantized != len(self.modules):
            raise PassError(f"{quantized} SpQRMatMul nodes for {len(self.modules)} modules (run after replace-linear)")
        if inserted:
            if (FUNCTION_DOMAIN, fname, "") not in model.functions:
                f = ir.serde.deserialize_function(act_quant_function(self.bits))
                model.functions[f.identifier()] = f
            if FUNCTION_DOMAIN not in model.opset_imports:
                model.opset_imports[FUNCTION_DOMAIN] = 1
            commit(graph)  # topological order
        return PassResult(model=model, modified=bool(inserted), counts={"act_quant_nodes": len(inserted)})
