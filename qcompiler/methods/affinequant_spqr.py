"""AffineQuant → SpQR (`--method affinequant+spqr`): learn AffineQuant's transforms, then quantize the transformed
weights with SpQR (small groups, 3-bit bilevel statistics, fp16 outliers).

Stage 1 runs `AffineQuant` with the SpQR grid as its training proxy (`bits`, `group_size`, learnable clipping); its
merged transforms are kept and its quantized weights discarded: every linear gets its transformed full-precision
weight back (`W Âᵀ`, the weight the graph holds after the fold passes). Stage 2 runs `SpQR` on that merged
full-precision model, so its Hessians are those of the transformed activations. The export is AffineQuant's (the
full-precision model with the transforms as nodes, folded by the passes) with SpQR's layers.

No published system combines the two; bench/quality.py measures whether it beats either alone.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import QCompilerError
from ..families import get_module
from . import register_method
from .affinequant import AffineQuant, AffineQuantConfig
from .base import Method, QuantizationResult
from .spqr import SpQR, SpQRConfig

_AQ_FIELDS = ("epochs", "let_lr", "lwc_lr", "wd", "init", "alpha", "sf", "ln_matrix", "aug_loss", "batch_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AffineQuantSpQRConfig(SpQRConfig):
    """SpQR's settings (`SpQRConfig`, its defaults) plus AffineQuant's training settings (`AffineQuantConfig`)."""

    epochs: int = dataclasses.field(default=20, metadata={"help": "AffineQuant epochs per decoder layer"})
    let_lr: float = dataclasses.field(default=5e-3, metadata={"help": "learning rate of the transforms"})
    lwc_lr: float = dataclasses.field(default=1e-2, metadata={"help": "learning rate of the clipping factors"})
    wd: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    init: str = dataclasses.field(default="smoothquant",
                                  metadata={"help": "initial transforms: smoothquant (act/weight statistics) or identity"})
    alpha: float = dataclasses.field(default=0.5, metadata={"help": "exponent of the initial SmoothQuant scales"})
    sf: float = dataclasses.field(default=1.0, metadata={"help": "stability factor: mask value off the diagonal"})
    ln_matrix: bool = dataclasses.field(default=False, metadata={"help": "full matrices for norm -> linears"})
    aug_loss: bool = dataclasses.field(default=False, metadata={"help": "add the loss on quantized inputs"})
    batch_size: int = dataclasses.field(default=1, metadata={"help": "calibration windows per optimizer step"})

    def affinequant(self) -> AffineQuantConfig:
        return AffineQuantConfig(bits=self.bits, group_size=self.group_size,
                                 **{f: getattr(self, f) for f in _AQ_FIELDS})

    def spqr(self) -> SpQRConfig:
        return SpQRConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SpQRConfig)})


@register_method("affinequant+spqr")
class AffineQuantSpQR(Method):
    """AffineQuant transforms, then SpQR on the transformed weights (see the module docstring)."""

    Config = AffineQuantSpQRConfig
    needs_calibration = True
    presets = {"sub4": {"bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3}}

    def quantize(self, model, family, *, calibration=None, progress=True) -> QuantizationResult:
        if not calibration:
            raise QCompilerError("affinequant+spqr needs calibration windows")
        cfg: AffineQuantSpQRConfig = self.config
        stage1 = AffineQuant(cfg.affinequant()).quantize(model, family, calibration=calibration, progress=progress)
        with torch.no_grad():  # back to the transformed full-precision weights (what SpQR must quantize)
            for path, W in stage1.expected.items():
                get_module(model, path).weight.copy_(torch.from_numpy(W))
        stage2 = SpQR(cfg.spqr()).quantize(model, family, calibration=calibration, progress=progress)
        for path, w in stage2.layers.items():
            b = stage1.expected_bias.get(path)
            if (w.bias is None) != (b is None):
                raise QCompilerError(f"{path}: SpQR's bias does not match the merged transform's")
        config = {"method": self.name, **dataclasses.asdict(cfg),
                  "affinequant_rel_error": stage1.totals["rel_error"]}
        return QuantizationResult(layers=stage2.layers, config=config, report=stage2.report,
                                  transforms=stage1.transforms, fp_state=stage1.fp_state,
                                  expected=stage1.expected, expected_bias=stage1.expected_bias)
