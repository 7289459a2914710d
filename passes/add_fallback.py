"""`add-fallback`: attach the portable ONNX function of `qcompiler::SpQRMatMul` (qcompiler/graph/fallback.py).

Each SpQRMatMul node gets the `overload` of its variant (code/statistics widths, optional inputs) and the model one
function per variant, so the model runs in a stock ONNX Runtime without the op library (slowly) and Netron can
expand the nodes. With the library registered, ORT runs the library's kernel: outputs do not change.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.graph.fallback import MIN_IR_VERSION, MIN_OPSET, Variant, fallback_function
from qcompiler.graph.format import DOMAIN, OP_TYPE

from .base import Pass, PassError, PassResult


def _variant(node: ir.Node) -> Variant:
    return Variant.of(ir.serde.serialize_node(node))


def _opset(model: ir.Model):
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


class AddFallback(Pass):
    """Set each SpQRMatMul node's overload and add the matching standard-op functions."""

    name = "add-fallback"
    preserves_outputs = True

    def requires(self, model: ir.Model) -> None:
        opset = _opset(model)
        if opset is None or opset < MIN_OPSET:
            raise PassError(f"the fallback functions need opset ≥ {MIN_OPSET} (the model has {opset})")

    def call(self, model: ir.Model) -> PassResult:
        # `qcompiler.graph.fallback.add_fallback_functions`, on the ir model
        opset = _opset(model)
        if opset is None or opset < MIN_OPSET:
            raise ValueError(f"the fallback functions need the model's default opset ≥ {MIN_OPSET}, got {opset}")
        before = len(model.functions)
        used: dict[str, int] = {}
        variants: dict[str, Variant] = {}
        for node in model.graph:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                v = _variant(node)
                node.overload = v.overload
                variants[v.overload] = v
                used[v.overload] = used.get(v.overload, 0) + 1
        for name, v in sorted(variants.items()):
            if (DOMAIN, OP_TYPE, name) not in model.functions:
                f = ir.serde.deserialize_function(fallback_function(v, opset=opset))
                model.functions[f.identifier()] = f
        if used:
            model.ir_version = max(model.ir_version, MIN_IR_VERSION)
        return PassResult(model, modified=bool(used),
                          counts={"nodes": sum(used.values()), "functions": len(model.functions) - before},
                          notes=[f"{name}: {n} node(s)" for name, n in sorted(used.items())])

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        defined = {f.overload for f in model.functions.values() if f.domain == DOMAIN and f.name == OP_TYPE}
        for node in model.graph:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                assert node.overload == _variant(node).overload, f"{node.name}: overload {node.overload!r}"
                assert node.overload in defined, f"{node.name}: no function for overload {node.overload!r}"
        assert model.ir_version >= MIN_IR_VERSION
