"""Portable fallback: `qcompiler::SpQRMatMul` as an ONNX function made of standard ops (opset ≥ 18).

A model that carries these functions runs in a stock ONNX Runtime without the op library (ORT inlines the function:
unpack the codes, decode the statistics, add the outliers, gather X by the permutation, one fp32 MatMul — slow,
exact), and Netron can expand each SpQRMatMul node into its definition. Where the library is registered, ORT
assigns the node to the library's kernel and the function is not used (tests/test_fallback.py checks both with
ORT's profiler).

The body depends on the codes' and statistics' bit widths and on which optional inputs a node has, so there is one
function per such combination, told apart by the function/node `overload` field (ONNX IR ≥ 10), e.g.
`w3s3_outliers_perm`. K, N, β1 and β2 are read from the node's attributes (`ref_attr_name`), so nodes of any shape
share a function. The math mirrors `SpQRWeight.dequantize` / `matmul` in qcompiler/graph/format.py (docs/spqr-format.md).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.graph.format import ACTIVATIONS, CHUNK, DOMAIN, INPUT_NAMES, OP_TYPE

MIN_OPSET = 18  # BitwiseAnd/BitwiseOr (18), ScatterND/ScatterElements with reduction="add" (16)
MIN_IR_VERSION = 10  # function overloads
ATTRIBUTES = ("K", "N", "bits", "group_size", "stat_bits", "stat_group_size", "accuracy_level", "activation")


@dataclasses.dataclass(frozen=True)
class Variant:
    """What the function body depends on: code and statistics widths, and which optional inputs are present."""

    bits: int
    stat_bits: int
    outliers: bool
    perm: bool
    bias: bool
    activation: str = ""

    @property
    def overload(self) -> str:
        return f"w{self.bits}s{self.stat_bits}" + "".join(
            f"_{name}" for name, on in (("outliers", self.outliers), ("perm", self.perm), ("bias", self.bias),
                                        (self.activation, bool(self.activation))) if on)

    @classmethod
    def of(cls, node: onnx.NodeProto) -> "Variant":
        """The variant of a SpQRMatMul node (from its attributes and which inputs it names)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        present = {name: i < len(node.input) and node.input[i] != "" for i, name in enumerate(INPUT_NAMES)}
        activation = attrs.get("activation", b"")
        activation = activation.decode() if isinstance(activation, bytes) else str(activation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"{node.name}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        return cls(bits=attrs["bits"], stat_bits=attrs["stat_bits"], outliers=present["outlier_row_ptr"],
                   perm=present["perm"], bias=present["bias"], activation=activation)


class FunctionBody:
    """Appends nodes to a function body; each `op` returns its (generated) output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr(self, name: str) -> str:
        """The node's int attribute `name` as a scalar int64 tensor."""
        out = f"attr_{name}"
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto(name="value_int", ref_attr_name=name, type=onnx.AttributeProto.INT)
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def unpack(self, packed: str, bits: int, n_codes: str) -> str:
        """uint8 `[R, ceil(C/32)·4·bits]` → uint8 codes `[R, C]` (C = the 1-D tensor `n_codes`); the inverse of
        `format.pack_codes`: 8-bit: byte i is code i; 4-bit: byte i holds codes i and 16+i; 2-bit: byte i holds codes i, 8+i, 16+i, 24+i;
        3-bit: a 2-bit plane of the low bits, then a little-endian uint32 whose bit i is bit 2 of code i."""
        u8 = np.uint8
        p = self.op("Reshape", packed, self.const([0, -1, 4 * bits], np.int64))  # [R, chunks, 4·bits]
        if bits == 8:
            codes = p
        elif bits == 4:
            codes = self.op("Concat", self.op("BitwiseAnd", p, self.const(15, u8)),
                            self.op("BitShift", p, self.const(4, u8), direction="RIGHT"), axis=-1)
        else:
            plane = p if bits == 2 else self.op("Slice", p, *(self.const([v], np.int64) for v in (0, 8, 2)))
            codes = self.op("Concat", *(self.op("BitwiseAnd", self.op("BitShift", plane, self.const(s, u8),
                                                                      direction="RIGHT"), self.const(3, u8))
                                        for s in (0, 2, 4, 6)), axis=-1)
            if bits == 3:
                word = self.op("Unsqueeze", self.op("Slice", p, *(self.const([v], np.int64) for v in (8, 12, 2))),
                               self.const([-1], np.int64))  # [R, chunks, 4, 1]: byte j holds codes 8j..8j+7
                hi = self.op("BitwiseAnd", self.op("BitShift", word, self.const(np.arange(8), u8),
                                                   direction="RIGHT"), self.const(1, u8))
                hi = self.op("Reshape", hi, self.const([0, 0, CHUNK], np.int64))
                codes = self.op("BitwiseOr", codes, self.op("BitShift", hi, self.const(2, u8), direction="LEFT"))
        flat = self.op("Reshape", codes, self.const([0, -1], np.int64))
        return self.op("Slice", flat, self.const([0], np.int64), n_codes, self.const([1], np.int64))


def fallback_function(variant: Variant, *, opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The `qcompiler::SpQRMatMul` function (overload `variant.overload`) in standard ops of `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"the fallback function needs opset ≥ {MIN_OPSET}, got {opset}")
    b = FunctionBody()
    f32 = TensorProto.FLOAT
    i64 = TensorProto.INT64
    one_d = b.const([1], np.int64)
    K, N = b.attr("K"), b.attr("N")
    K1, N1 = b.op("Reshape", K, one_d), b.op("Reshape", N, one_d)
    zero, one = b.const(0, np.int64), b.const(1, np.int64)

    codes = b.op("Cast", b.unpack("qweight", variant.bits, K1), to=f32)  # [N, K]
    if variant.stat_bits == 0:
        s = b.op("Transpose", b.op("Cast", "scales", to=f32), perm=[1, 0])  # [N, G]
        z = b.op("Transpose", b.op("Cast", "zeros", to=f32), perm=[1, 0])
    else:
        sc = b.op("Cast", b.unpack("scales", variant.stat_bits, N1), to=f32)  # [G, N]
        zc = b.op("Cast", b.unpack("zeros", variant.stat_bits, N1), to=f32)
        row_group = b.op("Div", b.op("Range", zero, N, one), b.attr("stat_group_size"))  # [N]
        st = b.op("Gather", b.op("Cast", "stats2", to=f32), row_group, axis=1)  # [G, N, 4]
        part = [b.op("Gather", st, b.const(i, np.int64), axis=2) for i in range(4)]  # each [G, N]
        s = b.op("Transpose", b.op("Mul", part[0], b.op("Sub", sc, part[1])), perm=[1, 0])
        z = b.op("Transpose", b.op("Mul", part[2], b.op("Sub", zc, part[3])), perm=[1, 0])
    col_group = b.op("Div", b.op("Range", zero, K, one), b.attr("group_size"))  # [K]
    w = b.op("Mul", b.op("Gather", s, col_group, axis=1),
             b.op("Sub", codes, b.op("Gather", z, col_group, axis=1)))  # [N, K], stored column order
    if variant.outliers:
        # CSR → (row, col): row of entry p = #{n ≥ 1 : row_ptr[n] ≤ p} (a scatter-add of ones, then a prefix sum)
        row_ptr = b.op("Cast", "outlier_row_ptr", to=i64)
        nnz = b.op("Shape", "outlier_col_idx")
        counts = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Add", nnz, one_d),
                                              value=numpy_helper.from_array(np.zeros(1, np.int64))),
                      b.op("Slice", row_ptr, one_d, b.op("Add", N1, one_d)),
                      b.op("ConstantOfShape", N1, value=numpy_helper.from_array(np.ones(1, np.int64))),
                      axis=0, reduction="add")
        rows = b.op("Slice", b.op("CumSum", counts, zero), b.const([0], np.int64), nnz)
        index = b.op("Concat", b.op("Unsqueeze", rows, one_d),
                     b.op("Unsqueeze", b.op("Cast", "outlier_col_idx", to=i64), one_d), axis=1)  # [nnz, 2]
        w = b.op("ScatterND", w, index, b.op("Cast", "outlier_values", to=f32), reduction="add")
    x = b.op("Cast", "X", to=f32)
    if variant.perm:  # stored column j multiplies input feature perm[j]
        x = b.op("Gather", x, b.op("Cast", "perm", to=i64), axis=-1)
    y = b.op("MatMul", x, b.op("Transpose", w, perm=[1, 0]))
    if variant.bias:
        y = b.op("Add", y, b.op("Cast", "bias", to=f32))
    if variant.activation == "silu_mul":  # the gate half, then the up half: silu(gate) · up
        half = b.op("Reshape", b.op("Div", N, b.const(2, np.int64)), one_d)
        gate = b.op("Slice", y, b.const([0], np.int64), half, b.const([-1], np.int64))
        up = b.op("Slice", y, half, N1, b.const([-1], np.int64))
        y = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    b.nodes.append(helper.make_node("CastLike", [y, "X"], ["Y"]))
    fn = helper.make_function(DOMAIN, OP_TYPE, list(INPUT_NAMES), ["Y"], b.nodes,
                              [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
                              doc_string=f"Portable definition of {DOMAIN}::{OP_TYPE} ({variant.overload}): dequantize "
                                         "in standard ops, then one fp32 MatMul. Used only where the op library is "
                                         "not registered.")
    fn.overload = variant.overload
    return fn


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def add_fallback_functions(model: onnx.ModelProto) -> dict[str, int]:
    """Give every SpQRMatMul node of `model` its variant's overload and add the functions (in place).

    Raises ValueError if the model's default opset is below 18. Returns `{overload: number of nodes}`."""
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"the fallback functions need the model's default opset ≥ {MIN_OPSET}, got {opset}")
    used: dict[str, int] = {}
    variants: dict[str, Variant] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            v = Variant.of(node)
            node.overload = v.overload
            variants[v.overload] = v
            used[v.overload] = used.get(v.overload, 0) + 1
    existing = {(f.domain, f.name, f.overload) for f in model.functions}
    for name, v in sorted(variants.items()):
        if (DOMAIN, OP_TYPE, name) not in existing:
            model.functions.append(fallback_function(v, opset=opset))
    if used:
        model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return used
