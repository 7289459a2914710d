"""Dynamic per-token activation quantization (AffineQuant / OmniQuant w4a4): one definition for PyTorch and ONNX.

Each quantized linear's input `x [..., K]` is fake-quantized per token (row) on an asymmetric `bits`-bit grid:

    scale = max((max(x) − min(x)) / maxq, 1e-5),  zero = round(−min(x) / scale),
    x̂ = (clamp(round(x / scale) + zero, 0, maxq) − zero) · scale

`act_fake_quant` is the PyTorch form (with a straight-through estimator for training); `act_quant_function` is the same
arithmetic as an ONNX model-local function `qcompiler.functions::ActQuantPerToken{bits}` (one node per quantized input
in Netron, inlined by ONNX Runtime). Both perform the same fp32 operations in the same order, so ONNX Runtime
reproduces PyTorch exactly (ONNX `Round` and `torch.round` both round half to even).
"""

from __future__ import annotations

from typing import Iterable

import torch
from onnx import FunctionProto, TensorProto, helper

FUNCTION_DOMAIN = "qcompiler.functions"
MIN_SCALE = 1e-5


def act_fake_quant(x: torch.Tensor, bits: int, *, ste: bool = False) -> torch.Tensor:
    """Per-token asymmetric fake quantization of `x` (last dim); `ste`: straight-through rounding for training."""
    maxq = float(2**bits - 1)
    xmax = x.amax(dim=-1, keepdim=True)
    xmin = x.amin(dim=-1, keepdim=True)
    scale = torch.clamp((xmax - xmin) / maxq, min=MIN_SCALE)
    zero = torch.round(-xmin / scale)
    y = x / scale
    r = y + (torch.round(y) - y).detach() if ste else torch.round(y)
    q = torch.clamp(r + zero, 0.0, maxq)
    return (q - zero) * scale


def install_act_quant(modules: Iterable[torch.nn.Module], bits: int, *, ste: bool = False) -> list:
    """Forward pre-hooks fake-quantizing each module's first input; returns the handles."""

    def hook(mod, args):
        return (act_fake_quant(args[0], bits, ste=ste), *args[1:])

    return [m.register_forward_pre_hook(hook) for m in modules]


def function_name(bits: int) -> str:
    return f"ActQuantPerToken{bits}"


def act_quant_function(bits: int, opset: int = 18) -> FunctionProto:
    """The ONNX function `x → x̂` (see the module docstring), fp32."""
    maxq = float(2**bits - 1)

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))

    nodes = [
        const("maxq", maxq),
        const("zero_f", 0.0),
        const("min_scale", MIN_SCALE),
        helper.make_node("ReduceMax", ["x", "axes"], ["xmax"], keepdims=1),
        helper.make_node("ReduceMin", ["x", "axes"], ["xmin"], keepdims=1),
        helper.make_node("Sub", ["xmax", "xmin"], ["range"]),
        helper.make_node("Div", ["range", "maxq"], ["raw_scale"]),
        helper.make_node("Max", ["raw_scale", "min_scale"], ["scale"]),
        helper.make_node("Neg", ["xmin"], ["neg_min"]),
        helper.make_node("Div", ["neg_min", "scale"], ["zero_raw"]),
        helper.make_node("Round", ["zero_raw"], ["zero"]),
        helper.make_node("Div", ["x", "scale"], ["y"]),
        helper.make_node("Round", ["y"], ["r"]),
        helper.make_node("Add", ["r", "zero"], ["q_raw"]),
        helper.make_node("Clip", ["q_raw", "zero_f", "maxq"], ["q"]),
        helper.make_node("Sub", ["q", "zero"], ["centered"]),
        helper.make_node("Mul", ["centered", "scale"], ["x_hat"]),
    ]
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [-1]))
    return helper.make_function(
        FUNCTION_DOMAIN, function_name(bits), ["x"], ["x_hat"], [axes, *nodes],
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string=f"dynamic per-token asymmetric {bits}-bit fake quantization (qcompiler/actquant.py)",
    )
