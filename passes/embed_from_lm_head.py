"""`embed-from-lm-head`: a tied embedding's token lookup served from the quantized lm_head (`qcompiler::SpQRGather`).

With `--lm-head` on a model whose embedding and lm_head share one table, the quantizer leaves both holding the lm_head's
decoded weight (qcompiler/quantize/lm_head.py), and the export carries it twice: the lm_head's SpQRMatMul
initializers and the embedding's float table. This pass replaces the embedding's `Gather(table, input_ids)` by
`SpQRGather(input_ids, qweight, scales, zeros)` over the SpQRMatMul's own initializers (qcompiler/graph/gather_op.py)
and adds the op's function; cleanup then drops the float table (SmolLM2-135M: 113 MB of fp32).

Matched by value, not by name: the Gather's table (axis 0) must equal the lm_head's decoded weight exactly, else
nothing changes (with a note).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.graph.edit import is_const
from qcompiler.graph.fallback import MIN_IR_VERSION
from qcompiler.graph.format import DOMAIN, SpQRWeight
from qcompiler.graph.gather_op import OP_TYPE, gather_function, overload, servable

from .base import Pass, PassError, PassResult


class EmbedFromLMHead(Pass):
    """Serve the tied embedding from the lm_head's SpQRMatMul.

    Args:
        head: module path of the lm_head (its node is `{head}/SpQRMatMul`).
        weight: its quantized weight (the values the embedding table must equal).
    """

    name = "embed-from-lm-head"
    preserves_outputs = True

    def __init__(self, head: str, weight: SpQRWeight):
        self.head, self.weight = head, weight

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        if not servable(self.weight):
            return PassResult(model, modified=False, notes=[f"{self.head}: bilevel statistics, outliers or a "
                                                            "permutation; the embedding keeps its table"])
        matmul = next((n for n in graph if n.name == f"{self.head}/SpQRMatMul" and n.domain == DOMAIN), None)
        if matmul is None:
            raise PassError(f"no {self.head}/SpQRMatMul node (replace-linear runs first)")
        decoded = self.weight.dequantize()
        replaced = 0
        for gather in [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx")]:
            table = gather.inputs[0]
            axis = gather.attributes.get("axis")
            if (axis is not None and axis.value != 0) or not is_const(table) \
                    or tuple(table.shape or ()) != decoded.shape:
                continue
            values = table.const_value.numpy()
            if not np.array_equal(values, decoded.astype(values.dtype)):
                continue
            node = ir.Node(DOMAIN, OP_TYPE, [gather.inputs[1], *matmul.inputs[1:4]], name=f"{self.head}/{OP_TYPE}",
                           attributes=[ir.AttrInt64(k, v) for k, v in (("K", self.weight.K), ("N", self.weight.N),
                                                                        ("bits", self.weight.bits),
                                                                        ("group_size", self.weight.group_size))],
                           overload=overload(self.weight.bits), num_outputs=1)
            node.outputs[0].name = f"{self.head}/{OP_TYPE}/rows"
            graph.insert_before(gather, node)
            out = node.outputs[0]
            if values.dtype != np.float32:  # the op decodes to fp32; the graph's dtype follows
                cast = ir.Node("", "Cast", [out], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT16)],
                               name=f"{self.head}/{OP_TYPE}/cast", num_outputs=1)
                graph.insert_before(gather, cast)
                out = cast.outputs[0]
            gather.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            replaced += 1
        if replaced:
            opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
            function = ir.serde.deserialize_function(gather_function(self.weight.bits, opset=opset))
            model.functions.setdefault(function.identifier(), function)
            model.opset_imports.setdefault(DOMAIN, 1)
            model.ir_version = max(model.ir_version, MIN_IR_VERSION)
        notes = [] if replaced else [f"no Gather reads a table equal to {self.head}'s decoded weight"]
        return PassResult(model, modified=replaced > 0, counts={"replaced": replaced}, notes=notes)

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        nodes = [n for n in model.graph if n.op_type == OP_TYPE and n.domain == DOMAIN]
        assert len(nodes) == result.counts["replaced"], f"{len(nodes)} {OP_TYPE} nodes"
        for n in nodes:
            assert (n.domain, n.op_type, n.overload) in model.functions, f"{n.name}: no function {n.overload}"
