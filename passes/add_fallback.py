"""`add-fallback`: attach the portable ONNX function of `qcompiler::SpQRMatMul` (qcompiler/fallback.py).

Each SpQRMatMul node gets the `overload` of its variant (code/statistics widths, optional inputs) and the model one
function per variant, so the model runs in a stock ONNX Runtime without the op library (slowly) and Netron can
expand the nodes. With the library registered, ORT runs the library's kernel: outputs do not change.
"""

from __future__ import annotations

import onnx

from qcompiler.fallback import MIN_IR_VERSION, MIN_OPSET, Variant, add_fallback_functions, default_opset
from qcompiler.format import DOMAIN, OP_TYPE

from .base import Pass, PassError, PassResult


class AddFallback(Pass):
    """Set each SpQRMatMul node's overload and add the matching standard-op functions."""

    name = "add-fallback"
    preserves_outputs = True

    def requires(self, model: onnx.ModelProto) -> None:
        opset = default_opset(model)
        if opset is None or opset < MIN_OPSET:
            raise PassError(f"the fallback functions need opset ≥ {MIN_OPSET} (the model has {opset})")

    def call(self, model: onnx.ModelProto) -> PassResult:
        before = len(model.functions)
        used = add_fallback_functions(model)
        return PassResult(model, modified=bool(used),
                          counts={"nodes": sum(used.values()), "functions": len(model.functions) - before},
                          notes=[f"{name}: {n} node(s)" for name, n in sorted(used.items())])

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        defined = {f.overload for f in model.functions if f.domain == DOMAIN and f.name == OP_TYPE}
        for node in model.graph.node:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                assert node.overload == Variant.of(node).overload, f"{node.name}: overload {node.overload!r}"
                assert node.overload in defined, f"{node.name}: no function for overload {node.overload!r}"
        assert model.ir_version >= MIN_IR_VERSION
