"""No quantization: the model exported at full precision, with no `SpQRMatMul` node.

The reference row of every perplexity table (`qcompiler export MODEL --method none`), and the graph ONNX Runtime's
own quantizers (`MatMulNBitsQuantizer`) start from.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from qcompiler.models.families import Family
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.base import Method, QuantizationResult


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoneConfig:
    """`--method none` takes no settings."""


@register_method("none")
class NoQuantization(Method):
    """Leaves every weight as it is; `quantize` returns no layers."""

    Config = NoneConfig
    needs_calibration = False
    quantizes = False

    def quantize(
        self,
        model: torch.nn.Module,
        family: Family,
        *,
        calibration: Optional[Sequence[torch.Tensor]] = None,
        progress: bool = True,
        device: Optional[torch.device] = None,
    ) -> QuantizationResult:
        return QuantizationResult(layers={}, config={"method": self.name}, report={})
