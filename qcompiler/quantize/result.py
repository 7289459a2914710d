"""What a quantization method returns: `QuantizationResult` and its per-layer report helpers.

This module sits below both the calibration engine (qcompiler/quantize/calibration.py, which builds results) and the
methods (qcompiler/quantize/methods/, which import the engine), so neither imports upward. `qcompiler.quantize.methods`
and `qcompiler.quantize.methods.base` re-export the names for compatibility.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from qcompiler.graph.format import SpQRWeight
from qcompiler.quantize.transforms import TransformPlan


@dataclasses.dataclass
class QuantizationResult:
    """What `Method.quantize` returns (the model itself was changed in place to its fake-quant weights).

    Attributes:
        layers: module path ("model.layers.0.self_attn.q_proj") → the layer in `SpQRMatMul` form.
        config: method name and its settings, JSON-serializable (goes into the output's config file).
        report: module path → {"avg_bits": stored bits per weight parameter, "rel_error": ‖W − Ŵ‖_F / ‖W‖_F,
            "outlier_share": outliers / parameters, "N": out_features, "K": in_features}.
        totals: over all layers: {"layers", "params", "avg_bits" (parameter-weighted), "rel_error" (mean over
            layers), "outlier_share" (parameter-weighted)}.
        activation_bits: bits of the dynamic activation quantization in front of every quantized linear (4 or 8),
            16 when activations stay in floating point (every method but AffineQuant with `abits < 16`); the driver
            adds the `quantize-activations` pass when it is below 16.
        transforms: learned transforms and what the export needs to rebuild the full-precision model around them
            (`qcompiler.quantize.transforms.TransformPlan`; methods with `learns_transforms`), else None. The model
            was merged in place; the export carries the transforms as nodes on the full-precision weights for the
            fold passes.
        head_hessian: `H = 2/n Σ x xᵀ` `[K, K]` of the lm_head's input over all calibration windows — the quantized
            decoder's final hidden states after the final norm — where the block-sequential engine ran
            (`quantize_blockwise`), else None; `--lm-head gptq` uses it instead of a forward of its own.
        head_windows: the windows `head_hessian` is over.
        layer_seconds: decoder layer path → {"seconds": wall time, "forward": of its calibration forwards, "solve":
            the rest} where the block-sequential engine ran, else empty.
    """

    layers: dict[str, SpQRWeight]
    config: dict[str, Any]
    report: dict[str, dict[str, float]]
    totals: dict[str, float] = dataclasses.field(default_factory=dict)
    activation_bits: int = 16
    transforms: Optional[TransformPlan] = None
    head_hessian: Optional[torch.Tensor] = None
    head_windows: int = 0
    layer_seconds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.totals:
            self.totals = summarize(self.report)


def layer_report(weight: torch.Tensor, evaluated: torch.Tensor, packed: SpQRWeight) -> dict[str, float]:
    """Per-layer report entry: stored avg bits, relative Frobenius error of the evaluated weight, outlier share."""
    w = weight.detach().float()
    err = (w - evaluated.float()).norm() / w.norm().clamp_min(1e-30)
    return {
        "N": packed.N,
        "K": packed.K,
        "avg_bits": packed.avg_bits(),
        "rel_error": float(err),
        "outlier_share": packed.nnz / (packed.N * packed.K),
    }


def summarize(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Totals of a per-layer report (see `QuantizationResult.totals`)."""
    if not report:
        return {"layers": 0, "params": 0, "avg_bits": 0.0, "rel_error": 0.0, "outlier_share": 0.0}
    params = {k: r["N"] * r["K"] for k, r in report.items()}
    total = sum(params.values())
    return {
        "layers": len(report),
        "params": total,
        "avg_bits": sum(r["avg_bits"] * params[k] for k, r in report.items()) / total,
        "rel_error": sum(r["rel_error"] for r in report.values()) / len(report),
        "outlier_share": sum(r["outlier_share"] * params[k] for k, r in report.items()) / total,
    }
