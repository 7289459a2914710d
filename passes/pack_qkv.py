"""`pack-qkv`: a GroupQueryAttention fed by the Split of one fused q/k/v SpQRMatMul reads the packed tensor.

After `fuse-sibling-linears`, q, k and v are outputs 0, 1, 2 of one Split of `[batch, seq, (H + 2·H_kv)·head]`;
`com.microsoft::GroupQueryAttention` takes exactly that layout as its query with key and value omitted (its packed
QKV form, which onnxruntime-genai's builder emits too), so the Split goes away. Only when the Split's three outputs
feed the node's first three inputs in order and nothing else; families with q/k norms (the norms sit between) keep
the Split. Runs after `cleanup` (dead shape computations no longer read q/k/v).
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.graph.edit import remove_unused_initializers, users

from .base import Pass, PassResult


class PackQKV(Pass):
    """GroupQueryAttention(Split(qkv)) → GroupQueryAttention(qkv) with key/value omitted."""

    name = "pack-qkv"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        packed = 0
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) < 3:
                continue
            q, k, v = node.inputs[:3]
            split = q.producer() if q is not None else None
            if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") \
                    or len(split.outputs) != 3 or list(split.outputs) != [q, k, v]:
                continue
            axis = split.attributes.get("axis")
            rank = len(split.inputs[0].shape) if split.inputs[0].shape is not None else None
            if axis is None or axis.value not in (-1, *((rank - 1,) if rank else ())):
                continue
            if any(len(users(o)) != 1 or o.is_graph_output() for o in split.outputs):
                continue
            node.replace_input_with(0, split.inputs[0])
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            graph.remove(split, safe=True)
            packed += 1
        remove_unused_initializers(graph)  # the Splits' sizes
        return PassResult(model, modified=packed > 0, counts={"packed": packed})
