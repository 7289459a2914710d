"""Round-to-nearest: min-max group quantization of each weight on its own, no calibration data.

The baseline every paper reports next to GPTQ/SpQR, and the simplest producer of `SpQRMatMul` layers (fp16
statistics, no outliers, no permutation).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from qcompiler.models.families import Family, quantizable_linears
from qcompiler.models.offload import keep_arrays
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.base import (
    Method,
    QuantizationResult,
    check_bits,
    check_group_size,
    dequantize_groups,
    layer_report,
    round_to_nearest,
    to_spqr_weight,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Settings of `RTN`.

    Attributes:
        bits: code width of the weights, 2, 3, 4 or 8.
        group_size: columns (input features) per scale/zero group; the last group may be ragged.
        round_zero: integer zero points with the range widened to include 0 (GPTQ's quantizer). False: exact
            per-group [min, max] range with a real-valued fp16 zero (lossless at 4 bits / group 32 on GGUF Q4_1
            weights, and lower error at small groups in general).
    """

    bits: int = dataclasses.field(default=4, metadata={"help": "weight code width: 2, 3, 4 or 8"})
    group_size: int = dataclasses.field(default=128, metadata={"help": "input features per scale/zero group"})
    round_zero: bool = dataclasses.field(
        default=True, metadata={"help": "integer zero points, range includes 0 (GPTQ); --no-round-zero: exact min-max"}
    )

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)


@register_method("rtn")
class RTN(Method):
    """Asymmetric min-max round-to-nearest per group of `group_size` input features, fp16 scale and zero.

    For each quantizable linear `W [N, K]`: per (row, group) `scale = (max − min) / (2^bits − 1)` and
    `zero = round(−min / scale)` (GPTQ's `Quantizer`, range widened to include 0; or the unrounded `−min / scale`
    over the exact range with `round_zero=False`), both rounded to fp16; codes
    `q = clamp(round(W / scale + zero), 0, 2^bits − 1)`; the weight is replaced by `scale · (q − zero)`.
    """

    Config = RTNConfig
    needs_calibration = False
    # --offload-weights (qcompiler/models/offload.py): the fp32 weights are file pages the kernel can drop; anonymous
    # memory holds the emitted model's ONNX Runtime session (compressed layers, fp32 embeddings) and per-tensor copies.
    # --dtype fp16 copies the whole model in memory (not offloaded): its factor stays.
    memory_offload_param_factor = 0.75

    def quantize(
        self,
        model: torch.nn.Module,
        family: Family,
        *,
        calibration: Optional[Sequence[torch.Tensor]] = None,
        progress: bool = True,
        device: Optional[torch.device] = None,
    ) -> QuantizationResult:
        cfg = self.config
        layers, report = {}, {}
        linears = quantizable_linears(model, family)
        for path, linear in tqdm(linears.items(), desc=f"rtn {cfg.bits}-bit g{cfg.group_size}", disable=not progress):
            w = linear.weight.detach() if device is None else linear.weight.detach().to(device)
            codes, scale, zero = round_to_nearest(w, bits=cfg.bits, group_size=cfg.group_size, round_zero=cfg.round_zero)
            evaluated = dequantize_groups(codes, scale, zero, cfg.group_size)
            packed = to_spqr_weight(codes, scale, zero, bits=cfg.bits, group_size=cfg.group_size, bias=linear.bias)
            report[path] = layer_report(w, evaluated, packed)
            with torch.no_grad():
                linear.weight.copy_(evaluated.to(device=linear.weight.device, dtype=linear.weight.dtype))
            layers[path] = keep_arrays(model, packed)
        return QuantizationResult(layers=layers, config={"method": self.name, **dataclasses.asdict(cfg)}, report=report)
