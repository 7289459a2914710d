"""`set-accuracy-level`: set the `accuracy_level` attribute of every `qcompiler::SpQRMatMul` node.

Level 4 lets the CPU kernel quantize each SpQRMatMul input to int8 per 32 columns and take its dot products with
AVX512-VNNI (the role of `accuracy_level` 4 on ONNX Runtime's MatMulNBits); 0 removes the attribute (fp32 compute).
Not an exact rewrite: it trades accuracy for speed (docs/kernels.md has the measured cost).
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.graph.format import DOMAIN, OP_TYPE

from .base import Pass, PassError, PassResult

LEVELS = (0, 4)


class SetAccuracyLevel(Pass):
    """Set (level 4) or remove (level 0) `accuracy_level` on every SpQRMatMul node.

    Args:
        level: 0 (fp32 activations) or 4 (int8 activations on CPUs with AVX512-VNNI; fp32 elsewhere).
    """

    name = "set-accuracy-level"

    def __init__(self, level: int):
        if level not in LEVELS:
            raise ValueError(f"accuracy level must be one of {LEVELS}, got {level}")
        self.level = level

    def requires(self, model: ir.Model) -> None:
        if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph):
            raise PassError("no SpQRMatMul node to set an accuracy level on")

    def call(self, model: ir.Model) -> PassResult:
        changed = 0
        for node in model.graph:
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            old = node.attributes.get("accuracy_level")
            if (old.as_int() if old is not None else 0) == self.level:
                continue
            if old is not None:
                del node.attributes["accuracy_level"]
            if self.level:
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", self.level)
            changed += 1
        return PassResult(model, modified=changed > 0, counts={"nodes": changed})

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        for node in model.graph:
            if node.domain == DOMAIN and node.op_type == OP_TYPE:
                attr = node.attributes.get("accuracy_level")
                levels = [attr.as_int()] if attr is not None else [0]
                assert levels == [self.level], f"{node.name}: accuracy_level {levels}"
