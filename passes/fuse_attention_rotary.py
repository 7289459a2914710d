"""`fuse-attention-rotary`: the rotary embeddings of a GroupQueryAttention's q and k computed inside the attention.

With fused attention (`qcompiler.graph.gqa`) each attention's q and k reach GroupQueryAttention as

    Reshape(Transpose₀₂₁₃(RotaryEmbedding(Transpose₀₂₁₃(h), position_ids, cos, sin)), [batch, seq, heads·head])

where `h` is `[batch, seq, heads, head]` (the projection split into heads, after the family's q/k norm if it has one)
and the RotaryEmbedding is `fuse-rotary`'s. GroupQueryAttention rotates q and k itself when given the same tables
(`do_rotary`, inputs 7 and 8): this pass feeds it `Reshape(h, [batch, seq, heads·head])` and the tables, and the
Transposes and RotaryEmbeddings go dead (4 kernels fewer per tensor, 8 per layer).

GroupQueryAttention takes a row's positions from its cache length (`seqlens_k`), not from `position_ids`: the graph
then assumes positions `past, past + 1, …` (what `qcompiler generate`, `eval` and onnxruntime-genai feed); matched only
where both RotaryEmbeddings read the graph input `position_ids` and one pair of tables. Whatever else reads the
intermediate tensors keeps them (the rewrite only reroutes the attention's inputs).
"""

from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from qcompiler.graph.edit import produced

from .base import Pass, PassResult

MS_DOMAIN = "com.microsoft"
_HEADS_FIRST = [0, 2, 1, 3]


def _perm(node: Optional[ir.Node]) -> Optional[list[int]]:
    attr = node.attributes.get("perm") if node is not None else None
    return list(attr.value) if attr is not None else None


def _match(value: ir.Value) -> Optional[tuple[ir.Node, ir.Value, ir.Node]]:
    """(the final Reshape, h, the RotaryEmbedding) of a rotated q/k input, else None."""
    reshape = produced(value, "Reshape")
    back = produced(reshape.inputs[0], "Transpose") if reshape is not None else None
    if back is None or _perm(back) != _HEADS_FIRST:
        return None
    rotary = back.inputs[0].producer()
    if rotary is None or rotary.op_type != "RotaryEmbedding" or rotary.domain != MS_DOMAIN or len(rotary.inputs) < 4:
        return None
    forth = produced(rotary.inputs[0], "Transpose")
    if forth is None or _perm(forth) != _HEADS_FIRST:
        return None
    return reshape, forth.inputs[0], rotary


class FuseAttentionRotary(Pass):
    """Move each GroupQueryAttention's q/k RotaryEmbeddings into the attention (`do_rotary = 1`)."""

    name = "fuse-attention-rotary"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        positions = next((v for v in graph.inputs if v.name == "position_ids"), None)
        fused, notes = 0, []
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
                continue
            attrs = node.attributes
            if attrs.get("do_rotary") is not None and attrs["do_rotary"].value:
                continue
            q, k = _match(node.inputs[0]), _match(node.inputs[1])
            if q is None or k is None:
                continue
            q_rot, k_rot = q[2], k[2]
            tables = [tuple(r.inputs[2:4]) for r in (q_rot, k_rot)]
            interleaved = {int(r.attributes["interleaved"].value) if "interleaved" in r.attributes else 0
                           for r in (q_rot, k_rot)}
            if tables[0] != tables[1] or len(interleaved) != 1 or positions is None \
                    or any(r.inputs[1] is not positions for r in (q_rot, k_rot)):
                notes.append(f"{node.name}: q/k rotations differ or do not read position_ids; left separate")
                continue
            for reshape, heads, _ in (q, k):
                reshape.replace_input_with(0, heads)  # [b, s, n, d] → [b, s, n·d]; the Transposes go dead
            if len(node.inputs) < 9:
                node.resize_inputs(9)
            node.replace_input_with(7, tables[0][0])
            node.replace_input_with(8, tables[0][1])
            attrs["do_rotary"] = ir.AttrInt64("do_rotary", 1)
            attrs["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", interleaved.pop())
            fused += 1
        return PassResult(model, modified=fused > 0, notes=notes, counts={"fused": fused})

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        rotated = [n for n in model.graph if n.op_type == "GroupQueryAttention" and "do_rotary" in n.attributes
                   and n.attributes["do_rotary"].value]
        assert len(rotated) >= result.counts["fused"], f"{result.counts['fused']} fused, {len(rotated)} found"
