"""`qcompiler::SpQRGather`: rows of a SpQRMatMul weight, decoded — the token lookup of a tied embedding served from the
quantized lm_head, so the table is stored once.

    inputs   indices (int64, any shape), qweight, scales, zeros   (the SpQRMatMul's initializers: fp16 statistics)
    attrs    K, N, bits, group_size                                (as SpQRMatMul's)
    output   float32 [*indices.shape, K]: row `i` is `W[i, :]` of docs/spqr-format.md (`SpQRWeight.dequantize()`)

The op is an ONNX function of standard ops (one per code width, told apart by the `overload` field "w4" etc.): ONNX
Runtime inlines it with or without the op library, and only the looked-up rows are decoded (one per token). Weights
with bilevel statistics, outliers or a permutation are not served this way (their rows need more than a gather).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.graph.fallback import MIN_OPSET, FunctionBody
from qcompiler.graph.format import DOMAIN, SpQRWeight

OP_TYPE = "SpQRGather"
INPUT_NAMES = ("indices", "qweight", "scales", "zeros")
ATTRIBUTES = ("K", "N", "bits", "group_size")


def servable(weight: SpQRWeight) -> bool:
    """Whether a weight's rows can be gathered by SpQRGather (fp16 statistics, no outliers, no permutation)."""
    return weight.stat_bits == 0 and weight.nnz == 0 and weight.perm is None


def overload(bits: int) -> str:
    return f"w{bits}"


def gather_function(bits: int, *, opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The SpQRGather function for `bits`-wide codes, in standard ops of `opset` (≥ 18)."""
    if opset < MIN_OPSET:
        raise ValueError(f"SpQRGather needs opset ≥ {MIN_OPSET}, got {opset}")
    b = FunctionBody()
    f32 = TensorProto.FLOAT
    K = b.attr("K")
    K1 = b.op("Reshape", K, b.const([1], np.int64))
    flat = b.op("Reshape", "indices", b.const([-1], np.int64))  # [T]
    codes = b.op("Cast", b.unpack(b.op("Gather", "qweight", flat, axis=0), bits, K1), to=f32)  # [T, K]
    s = b.op("Transpose", b.op("Gather", b.op("Cast", "scales", to=f32), flat, axis=1), perm=[1, 0])  # [T, G]
    z = b.op("Transpose", b.op("Gather", b.op("Cast", "zeros", to=f32), flat, axis=1), perm=[1, 0])
    col_group = b.op("Div", b.op("Range", b.const(0, np.int64), K, b.const(1, np.int64)), b.attr("group_size"))
    rows = b.op("Mul", b.op("Gather", s, col_group, axis=1), b.op("Sub", codes, b.op("Gather", z, col_group, axis=1)))
    shape = b.op("Concat", b.op("Shape", "indices"), K1, axis=0)
    b.nodes.append(helper.make_node("Reshape", [rows, shape], ["Y"]))
    fn = helper.make_function(DOMAIN, OP_TYPE, list(INPUT_NAMES), ["Y"], b.nodes, [helper.make_opsetid("", opset)],
                              attributes=list(ATTRIBUTES),
                              doc_string=f"{DOMAIN}::{OP_TYPE} ({overload(bits)}): rows `indices` of a SpQRMatMul "
                                         "weight with fp16 statistics, decoded to float32.")
    fn.overload = overload(bits)
    return fn


def reference(indices: np.ndarray, weight: SpQRWeight) -> np.ndarray:
    """NumPy reference of the op."""
    return weight.dequantize()[np.asarray(indices, dtype=np.int64)]
