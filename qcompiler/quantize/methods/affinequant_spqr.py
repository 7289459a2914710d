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

from qcompiler import QCompilerError
from qcompiler.models.families import get_module
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.affinequant import AffineQuant, AffineQuantConfig
from qcompiler.quantize.methods.base import Method, QuantizationResult
from qcompiler.quantize.methods.spqr import SpQR, SpQRConfig

# AffineQuant's training settings the combination takes over (its `bits`/`group_size` are SpQR's; `let`, `lwc` and
# `abits` do not apply: the transforms are always learned, SpQR replaces the clipping, activations stay fp).
AFFINEQUANT_FIELDS = ("epochs", "let_lr", "lwc_lr", "wd", "init", "alpha", "sf", "ln_matrix", "aug_loss", "batch_size")


class _AffineQuantSpQRSettings:
    """Methods of `AffineQuantSpQRConfig` (its fields are derived below)."""

    def affinequant(self) -> AffineQuantConfig:
        """Stage 1's settings: SpQR's grid (`bits`, `group_size`) and the AffineQuant training settings."""
        return AffineQuantConfig(bits=self.bits, group_size=self.group_size,
                                 **{f: getattr(self, f) for f in AFFINEQUANT_FIELDS})

    def spqr(self) -> SpQRConfig:
        """Stage 2's settings: every `SpQRConfig` field."""
        return SpQRConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SpQRConfig)})


def _derived_fields(source: type, names: tuple[str, ...]) -> list[tuple[str, object, dataclasses.Field]]:
    """`make_dataclass` declarations of the fields `names` of dataclass `source` (type, default, help), in order."""
    fields = {f.name: f for f in dataclasses.fields(source)}
    return [(n, fields[n].type, dataclasses.field(default=fields[n].default, metadata=fields[n].metadata))
            for n in names]


# SpQR's settings (`SpQRConfig`, its fields and defaults first) plus AffineQuant's training settings
# (`AffineQuantConfig`'s declarations of `AFFINEQUANT_FIELDS`, in that order): the field order is the order of the
# config in the output's metadata.
AffineQuantSpQRConfig = dataclasses.make_dataclass(
    "AffineQuantSpQRConfig",
    _derived_fields(AffineQuantConfig, AFFINEQUANT_FIELDS),
    bases=(_AffineQuantSpQRSettings, SpQRConfig),
    frozen=True,
    kw_only=True,
    namespace={"__module__": __name__, "__doc__": "SpQR's settings (`SpQRConfig`) plus AffineQuant's training settings "
                          "(`AffineQuantConfig`, the fields in `AFFINEQUANT_FIELDS`)."},
)


@register_method("affinequant+spqr")
class AffineQuantSpQR(Method):
    """AffineQuant transforms, then SpQR on the transformed weights (see the module docstring)."""

    Config = AffineQuantSpQRConfig
    needs_calibration = True
    learns_transforms = True
    device_solvers = False  # the training loop runs on the CPU (qcompiler/quantize/device.py)
    # AffineQuant's training and transforms dominate the peak (SpQR's per-layer state is smaller)
    memory_param_factor = AffineQuant.memory_param_factor
    memory_offload_param_factor = AffineQuant.memory_offload_param_factor
    memory_activation_copies = AffineQuant.memory_activation_copies
    presets = {"sub4": {"bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3}}

    def quantize(self, model, family, *, calibration=None, progress=True, device=None) -> QuantizationResult:
        if not calibration:
            raise QCompilerError("affinequant+spqr needs calibration windows")
        self.check_device(device)
        cfg = self.config
        stage1 = AffineQuant(cfg.affinequant()).quantize(model, family, calibration=calibration, progress=progress)
        with torch.no_grad():  # back to the transformed full-precision weights (what SpQR must quantize)
            for path, W in stage1.transforms.expected.items():
                get_module(model, path).weight.copy_(torch.from_numpy(W))
        stage2 = SpQR(cfg.spqr()).quantize(model, family, calibration=calibration, progress=progress, device=device)
        for path, w in stage2.layers.items():
            b = stage1.transforms.expected_bias.get(path)
            if (w.bias is None) != (b is None):
                raise QCompilerError(f"{path}: SpQR's bias does not match the merged transform's")
        config = {"method": self.name, **dataclasses.asdict(cfg),
                  "affinequant_rel_error": stage1.totals["rel_error"]}
        return QuantizationResult(layers=stage2.layers, config=config, report=stage2.report,
                                  transforms=stage1.transforms)
