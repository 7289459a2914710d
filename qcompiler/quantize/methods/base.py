"""What every quantization method shares: the method contract and the group-quantization math (the result type lives
in qcompiler/quantize/result.py, below the calibration engine, and is re-exported here).

The fake-quant decode `dequantize_groups` is the torch twin of `SpQRWeight.dequantize` (qcompiler/graph/format.py): the
same fp32 operations in the same order, so the weight a method evaluates in PyTorch is bit for bit the weight the
exported `SpQRMatMul` decodes (tested in tests/test_rtn.py).
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from qcompiler import QCompilerError
from qcompiler.graph.format import SUPPORTED_BITS, SpQRWeight
from qcompiler.quantize.result import QuantizationResult, layer_report, summarize  # noqa: F401  (re-exported)

FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------------- contract
class Method(abc.ABC):
    """A quantization algorithm. Subclasses set `Config` (a keyword-only frozen dataclass whose fields become CLI
    flags) and the class attributes below that differ from the defaults, and are registered with
    `@register_method("name")`.

    `quantize` walks the model's quantizable linears (see `qcompiler.models.families`), replaces each weight in place by its
    evaluated (fake-quant) weight, and returns the `SpQRWeight` per layer. Calibration-based methods (GPTQ, SpQR,
    AffineQuant) receive `calibration`: a list of token windows `LongTensor [1, seqlen]`.

    What the driver (qcompiler/pipeline.py) and the memory preflight (`qcompiler.models.preflight.estimate_memory`)
    read off the class, before anything is loaded:

    Attributes:
        needs_calibration: `quantize` needs calibration windows (the driver loads the calibration text).
        quantizes: False only for `none`: an empty `QuantizationResult.layers` is then not an error.
        learns_transforms: `quantize` returns a `TransformPlan` in `QuantizationResult.transforms` (the export is
            the full-precision model with the transforms as nodes, folded by the passes; fp32 graphs only).
        memory_param_factor: peak resident memory of an export in multiples of the model's fp32 parameter bytes,
            on top of a fixed base (measured figures next to each method's value).
        memory_offload_param_factor: the same with `--offload-weights` (anonymous memory only: the weights are file
            pages); None: offloading does not lower the estimate (`memory_param_factor` applies).
        memory_activation_copies: calibration activation buffers `[nsamples, seqlen, hidden]` fp32 held at once
            (counted only when `needs_calibration`).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    needs_calibration: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True
    learns_transforms: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # `--preset NAME` → Config fields (explicit flags override)
    # Measured by `qcompiler export` itself (its per-stage peak RSS) with the exporter's weights left in its file
    # (qcompiler/graph/external.py): SmolLM2-135M RTN (538 MB of fp32 parameters) 1.67 GB, synthetic LLaMAs of 0.98 GB
    # 2.19 GB and of 2.55 GB 6.83 GB (bench/large_model.py) → at most 2.5× + base; 3.5× keeps a margin for
    # GPTQ/SpQR's per-layer state.
    memory_param_factor: ClassVar[float] = 3.5
    memory_offload_param_factor: ClassVar[Optional[float]] = None
    # the layer inputs and outputs of the calibration engine (qcompiler/quantize/calibration.py), plus a margin
    memory_activation_copies: ClassVar[int] = 3
    # the solvers run on `--device` (the calibration engine's methods); False: on the CPU only (`check_device`)
    device_solvers: ClassVar[bool] = True

    def __init__(self, config: Optional[Any] = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def default_accuracy_level(cls, config: Any, *, lm_head: bool = False) -> int:
        """`accuracy_level` of an export with `config` (and a quantized lm_head where `lm_head`) when
        `--accuracy-level` is not given: 4 (int8 activations in the CPU kernel) only where its perplexity cost was
        measured at ≤ 0.5 %, else 0 (fp32 activations)."""
        return 0

    @classmethod
    def check_device(cls, device: Optional[torch.device]) -> None:
        """One-line error for a `--device` other than the CPU where the method's solvers run on the CPU only
        (`device_solvers` False)."""
        if not cls.device_solvers and device is not None and torch.device(device).type != "cpu":
            raise QCompilerError(f"--device {device}: {cls.name} trains its transforms on the CPU only for now "
                                 "(--device cpu; gptq, spqr and rtn run on a GPU)")

    @classmethod
    def default_lm_head(cls, config: Any) -> Optional[str]:
        """`--lm-head` method for an export with `config` when `--lm-head` is not given (`auto`, fp32 graphs only): a
        method of `qcompiler.quantize.lm_head` (its own default width) only where the whole default export was
        measured with and without it, else None (the table kept at the export dtype)."""
        return None

    @abc.abstractmethod
    def quantize(
        self,
        model: torch.nn.Module,
        family,
        *,
        calibration: Optional[Sequence[torch.Tensor]] = None,
        progress: bool = True,
        device: Optional[torch.device] = None,
    ) -> QuantizationResult:
        """Quantize `model` (a HF causal LM of `family`) in place; return the per-layer op representation.
        `device`: where the solvers run (`--device`, qcompiler/quantize/device.py); None: where the model is."""


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QCompilerError(f"bits must be 2, 3, 4 or 8 (got {bits})")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise QCompilerError(f"group size must be a positive integer (got {group_size})")


# ---------------------------------------------------------------------------------------------------- group math
def group_index(K: int, group_size: int, device=None) -> torch.Tensor:
    """`[K]` group of each column (`j // group_size`); the last group may be ragged."""
    return torch.arange(K, device=device) // group_size


def to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor of the values as stored in fp16 (round to nearest even)."""
    return x.to(torch.float16).to(torch.float32)


def minmax_params(w: torch.Tensor, *, bits: int, round_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and zero per row of `w [R, C]`, rounded to fp16 as they are stored.

    `round_zero=True` is GPTQ's `Quantizer.find_params`: the range is widened to include 0 and
    `zero = round(−min / scale)` is an integer in [0, maxq]. `round_zero=False` keeps the exact range [min, max]
    and a real-valued `zero = −min / scale` (the grid then hits both ends up to fp16 rounding, like GGUF Q4_1's
    `d·q + m`). A constant row gets a nonzero range around its value.

    Returns `(scale, zero)`, float32 `[R]` holding fp16-representable values.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values
    xmax = w.max(dim=1).values
    if round_zero:
        xmin = torch.clamp(xmin, max=0.0)
        xmax = torch.clamp(xmax, min=0.0)
    same = xmin == xmax
    pad = torch.where(xmin == 0, torch.ones_like(xmin), xmin.abs())
    if round_zero:  # GPTQ: [-1, 1] for an all-zero row (the only constant row once 0 is in the range)
        xmin = torch.where(same, xmin - pad, xmin)
    xmax = torch.where(same, xmax + pad, xmax)  # exact: the constant is the grid's first point
    scale = to_fp16_grid(((xmax - xmin) / maxq).clamp(FP16_MIN_SUBNORMAL, FP16_MAX))
    zero = -xmin / scale
    zero = torch.clamp(torch.round(zero), 0, maxq) if round_zero else zero.clamp(-FP16_MAX, FP16_MAX)
    return scale, to_fp16_grid(zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Codes `q = clamp(round(w / scale + zero), 0, maxq)` (scale/zero broadcast against `w`), as uint8."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale + zero), 0, maxq).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Evaluated weight `[N, K]` float32: `W[n, j] = scale[n, g] * (codes[n, j] - zero[n, g])`, `g = j // group_size`.

    Args:
        codes: integer `[N, K]`.
        scale, zero: float32 `[N, G]`, `G = ceil(K / group_size)` (fp16-representable when stored as fp16).

    Exactly the arithmetic of `SpQRWeight.dequantize_stored` (fp32 subtract, then fp32 multiply).
    """
    g = group_index(codes.shape[1], group_size, device=codes.device)
    return scale.float()[:, g] * (codes.to(torch.float32) - zero.float()[:, g])


def round_to_nearest(
    w: torch.Tensor, *, bits: int, group_size: int, round_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max RTN of `w [N, K]` in groups of `group_size` columns (ragged last group allowed); `round_zero` as in
    `minmax_params`.

    Returns `(codes uint8 [N, K], scale float32 [N, G], zero float32 [N, G])`; scale/zero are fp16-representable
    and the codes are the nearest grid points for exactly those stored values.
    """
    check_bits(bits)
    check_group_size(group_size)
    w = w.detach().float()
    N, K = w.shape
    G = math.ceil(K / group_size)
    pad = G * group_size - K
    wp = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1) if pad else w  # edge padding keeps each group's min/max
    scale, zero = minmax_params(wp.reshape(N * G, group_size), bits=bits, round_zero=round_zero)
    scale, zero = scale.reshape(N, G), zero.reshape(N, G)
    g = group_index(K, group_size, device=w.device)
    codes = quantize_codes(w, scale[:, g], zero[:, g], bits=bits)
    return codes, scale, zero


def to_spqr_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    outliers: Optional[torch.Tensor] = None,
    perm: Optional[torch.Tensor] = None,
) -> SpQRWeight:
    """Pack fp16-statistics results (`stat_bits = 0`) into the op representation."""
    return SpQRWeight.from_codes(
        codes=codes.cpu().numpy(),
        bits=bits,
        group_size=group_size,
        scales=scale.cpu().numpy().astype(np.float16),
        zeros=zero.cpu().numpy().astype(np.float16),
        outliers=None if outliers is None else outliers.detach().float().cpu().numpy(),
        perm=None if perm is None else perm.cpu().numpy(),
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
    )
