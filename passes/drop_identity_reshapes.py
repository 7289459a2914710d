"""`drop-identity-reshapes`: chains of Reshapes that end where they started read their start directly.

The exporter splits each projection into heads and joins them back (`[batch, seq, heads·head]` → `[batch, seq, heads,
head]` → `[batch, seq, heads·head]`); with fused attention the attention reads and writes the joined form, so q, k, v
and the attention output pass through two Reshapes each that change nothing (SmolLM2-135M: 240 kernels of a decode
step, ~1.4 ms of profiled kernel time on one thread). ONNX Runtime's optimiser leaves them: their target shapes are
computed at run time (`Concat(Shape(...))`).

A Reshape's consumers are given the chain's first input instead when both have the same shape as the exporter
recorded it, dimension by dimension: equal integers, or the same named symbolic dimension (`batch`,
`sequence_length`). Anything with an unknown dimension is left alone.
"""

from __future__ import annotations

from typing import Optional

import onnx_ir as ir

from qcompiler.graph.edit import produced, users

from .base import Pass, PassResult


def _dims(value: ir.Value) -> Optional[tuple]:
    """The value's shape as a tuple of ints and symbolic names, or None if any dimension is unknown."""
    if value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value:
            dims.append(d.value)
        else:
            return None
    return tuple(dims)


class DropIdentityReshapes(Pass):
    """Bypass Reshape chains whose output shape equals their input's."""

    name = "drop-identity-reshapes"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        bypassed = 0
        for node in list(graph):
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
                continue
            out = node.outputs[0]
            start = node.inputs[0]
            while produced(start, "Reshape") is not None:
                start = start.producer().inputs[0]
            want = _dims(out)
            if want is None or out.is_graph_output() or not users(out) or _dims(start) != want \
                    or start.dtype != out.dtype:
                continue
            out.replace_all_uses_with(start)
            bypassed += 1
        return PassResult(model, modified=bypassed > 0, counts={"bypassed": bypassed})
