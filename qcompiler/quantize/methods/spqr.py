"""SpQR (Dettmers et al. 2023, reference implementation Vahe1994/SpQR `spqr_engine.py`, `quant_groups.py`).

GPTQ-style error feedback over the input features of one linear layer with three additions:

- small first-level groups (β1 input features, e.g. 16) whose per-row scale and zero are themselves quantized to
  `stat_bits` with min-max statistics over β2 consecutive output rows (*bilevel* statistics; the second-level
  statistics are stored in fp16);
- unstructured outliers: a weight whose Hessian-weighted quantization error `((w − ŵ) / U_jj)²` exceeds
  `τ · mean_j(var_n(W[:, j]) / U_jj²)` (U = Cholesky factor of H⁻¹) is kept in fp16;
- before a group's quantizer is fit, a leave-one-out pass marks the weights whose removal most reduces the group's
  Hessian-weighted error; the quantizer is fit with those weights replaced by the row mean of the others.

Where this module deliberately differs from the reference (everything else follows it step by step):

- Exactness: the weight the loop evaluates (and propagates the error of) is exactly what `SpQRMatMul` decodes.
  Second-level statistics are rounded to fp16 before the first-level codes are chosen; the decoded scale/zero are
  `ss·(code − sz)`, `zs·(code − zz)` in fp32; the column is `s·(q − z)` in fp32; an outlier is stored as the fp16
  delta over the dense value, so its evaluated value is `dense + f32(fp16(w − dense))` (the reference keeps the
  exact fp32 `w`). With `stat_bits = 0` scale and zero are rounded to fp16 as `minmax_params(round_zero=False)`.
- At an outlier the dense code is the nearest code of `w` itself (the reference stores the code of 0 and a
  replacing value); with additive deltas this keeps the delta, and so its fp16 rounding, small.
- A constant range (min == max), in the first-level fit, the leave-one-out fits and the second-level fits, is
  widened to `[v, v + |v|]` (`[0, 1]` for 0) so the constant is a grid point; the reference uses `[−1, 1]`, which
  turns e.g. an all-zero (dead) group or a group of β2 equal scales into a coarse grid that misses the value.
- Ragged groups are allowed: the last β1 group along K and the last β2 group along N may be shorter (the reference
  needs N divisible by β2).

Kept from the reference although GPTQ (qcompiler/quantize/methods/gptq.py) does it differently: the permutation is computed
before dead inputs are handled (dead inputs, `H_jj = 0`, sort last), the damping is `percdamp · mean|diag H|` over
all inputs including dead ones, and a group that straddles a lazy-update block is fit partly on columns that do not
have that block's updates yet (GPTQ aligns blocks to groups). Without dead inputs and with `block_size` a multiple
of `group_size`, SpQR at τ = ∞ with fp16 statistics is bit for bit GPTQ with `round_zero=False` (tested).

Storage: `SpQRWeight.avg_bits()` counts the stored arrays. The paper's estimate `bits + 2·stat_bits/β1 +
64/(β1·β2) + 32·outlier_share` (`paper_avg_bits`) leaves out the CSR row pointers (32·(N+1) bits), the permutation
(32·K bits) and the padding of codes to 32-wide chunks; both are in each layer's report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

from qcompiler import QCompilerError
from qcompiler.quantize.calibration import LayerQuantization, quantize_blockwise
from qcompiler.graph.format import SpQRWeight
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.base import (
    FP16_MAX,
    Method,
    QuantizationResult,
    check_bits,
    layer_report,
    minmax_params,
    quantize_codes,
    to_fp16_grid,
)
from qcompiler.quantize.methods.gptq import inverse_hessian_cholesky  # the same H⁻¹ Cholesky factor as GPTQ (tested equal at τ = ∞)

log = logging.getLogger(__name__)

GROUP_SIZES = range(8, 129)  # β1 and β2 accepted by the config
STAT_BITS = (0, 2, 3, 4)
_EPS = 1e-9  # the reference's lower clamp of a scale before dividing by it


# ---------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRConfig:
    """Settings of `SpQR`. Defaults are the reference's near-lossless preset (README: `--wbits 4 --groupsize 16
    --qq_scale_bits 3 --qq_zero_bits 3 --qq_groupsize 16 --outlier_threshold 0.2 --permutation_order act_order
    --percdamp 1e0`, round_zero off).

    Attributes:
        bits: code width of the weights, 2, 3, 4 or 8.
        group_size: β1, input features per first-level scale/zero group (8…128; the last group may be ragged).
        stat_bits: code width of the first-level scale and zero (2…4; SpQR's bilevel statistics), or 0 to store
            them as fp16.
        stat_group_size: β2, output rows sharing one set of fp16 second-level statistics (8…128).
        outlier_threshold: τ, relative threshold of unstructured outliers (in units of the layer's mean
            Hessian-weighted weight variance); larger τ → fewer outliers; `inf` turns outliers off.
        act_order: quantize input features in order of decreasing Hessian diagonal (stored as the op's `perm`).
        percdamp: damping added to the Hessian diagonal, relative to its mean (1.0 = 100 %, the reference preset).
        block_size: columns per lazy-batch block of the error feedback (speed only, up to groups that straddle
            blocks).
        true_sequential: quantize the linears of a decoder layer group by group, each group calibrated on the
            outputs of the already quantized ones. Off by default like the reference preset (its README command
            does not pass `--true-sequential`): one calibration forward per layer instead of one per group.
        simplified_outliers: skip the leave-one-out outlier pre-detection when fitting a group's quantizer
            (faster, usually worse).
        target_bits: average stored bits per decoder-linear parameter to reach (None: every linear gets the
            settings above). Set, each linear gets one of the settings of `qcompiler.quantize.allocation.MENU`
            (bits, β1, β2, τ, act-order) chosen by a measured sensitivity so that the stored bits average this
            value; `act_order`, `percdamp`, `block_size`, `true_sequential`, `simplified_outliers` and
            `stat_bits` still apply to all of them.
        sensitivity: with `target_bits`: an earlier `--target-bits` export (folder or its quant_config.json) whose
            probe to reuse instead of measuring one (`qcompiler.quantize.sensitivity.load_probe`: refused unless
            measured on the same weights, probe windows and menu).
    """

    bits: int = dataclasses.field(default=4, metadata={"help": "weight code width: 2, 3, 4 or 8"})
    group_size: int = dataclasses.field(
        default=16, metadata={"help": "input features per scale/zero group (SpQR: beta1, 8-128)"}
    )
    stat_bits: int = dataclasses.field(
        default=3, metadata={"help": "(spqr) code width of the group scales/zeros: 2-4, or 0 for fp16"}
    )
    stat_group_size: int = dataclasses.field(
        default=16, metadata={"help": "(spqr) output rows per fp16 second-level statistics group (beta2, 8-128)"}
    )
    outlier_threshold: float = dataclasses.field(
        default=0.2, metadata={"help": "(spqr) relative outlier threshold tau; larger = fewer outliers, inf = none"}
    )
    act_order: bool = dataclasses.field(
        default=True, metadata={"help": "quantize input features by decreasing Hessian diagonal"}
    )
    percdamp: float = dataclasses.field(
        default=1.0, metadata={"help": "Hessian damping relative to the mean diagonal (SpQR preset: 1.0)"}
    )
    block_size: int = dataclasses.field(default=128, metadata={"help": "columns per lazy-batch update block"})
    true_sequential: bool = dataclasses.field(
        default=False, metadata={"help": "quantize a layer's linears group by group on already-quantized inputs"}
    )
    simplified_outliers: bool = dataclasses.field(
        default=False, metadata={"help": "(spqr) skip leave-one-out outlier detection when fitting groups"}
    )
    target_bits: float | None = dataclasses.field(
        default=None, metadata={"help": "(spqr) average stored bits per decoder-linear parameter: each linear's "
                                        "bits, groups and outliers are chosen by measured sensitivity to reach it"}
    )
    sensitivity: str | None = dataclasses.field(
        default=None, metadata={"help": "(spqr) with --target-bits: reuse the sensitivity probe of an earlier "
                                        "--target-bits export of the same model and calibration (its folder), "
                                        "so another target costs the SpQR pass only"}
    )

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for name in ("group_size", "stat_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value not in GROUP_SIZES:
                raise QCompilerError(f"{name} must be an integer in 8..128 (got {value})")
        if self.stat_bits not in STAT_BITS:
            raise QCompilerError(f"stat_bits must be 0 (fp16 statistics), 2, 3 or 4 (got {self.stat_bits})")
        if not self.outlier_threshold >= 0:  # also rejects NaN
            raise QCompilerError(f"outlier_threshold must be >= 0 or inf (got {self.outlier_threshold})")
        if not (self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise QCompilerError(f"percdamp must be a finite number >= 0 (got {self.percdamp})")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise QCompilerError(f"block_size must be a positive integer (got {self.block_size})")
        if self.target_bits is not None and not (isinstance(self.target_bits, (int, float))
                                                 and 2.0 <= self.target_bits <= 16.0):
            raise QCompilerError(f"target_bits must be a number of bits per parameter in 2..16 (got {self.target_bits})")
        if self.sensitivity is not None and self.target_bits is None:
            raise QCompilerError("--sensitivity reuses a --target-bits probe: give --target-bits too")


# ---------------------------------------------------------------------------------------------------- group grids
@dataclasses.dataclass
class GroupGrid:
    """The quantization grid of one first-level group, per output row, as the op decodes it.

    Attributes:
        scale, zero: float32 `[N]` decoded scale and zero (fp32 arithmetic of docs/spqr-format.md).
        scale_stored, zero_stored: `[N]` what is stored: fp16-representable float32 values (stat_bits = 0) or
            integer codes (stat_bits > 0).
        stats2: float32 `[N2, 4]` fp16-representable (scale_scale, scale_zero, zero_scale, zero_zero), or None.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    scale_stored: torch.Tensor
    zero_stored: torch.Tensor
    stats2: Optional[torch.Tensor] = None


def _minmax_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row `[min, max]` of `x [..., C]` over the last dim; a constant row `v` gets `[v, v + |v|]` (`[0, 1]`)."""
    xmin = x.min(dim=-1).values
    xmax = x.max(dim=-1).values
    pad = torch.where(xmin == 0, torch.ones_like(xmin), xmin.abs())
    return xmin, torch.where(xmin == xmax, xmax + pad, xmax)


def _quantize_stat(v: torch.Tensor, *, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-level min-max quantization of first-level statistics `v [N]` in groups of `group_size` rows.

    The reference's `qq_scale`/`qq_zero` quantizer (asymmetric, real-valued zero) with its own statistics rounded to
    fp16 before the codes are chosen. Returns `(codes long [N], stats float32 [N2, 2] (scale, zero) fp16-exact,
    decoded float32 [N] = scale·(code − zero))`.
    """
    N = v.numel()
    N2 = math.ceil(N / group_size)
    pad = N2 * group_size - N
    vp = torch.cat([v, v[-1:].expand(pad)]) if pad else v  # edge padding keeps the ragged group's min/max
    scale2, zero2 = minmax_params(vp.reshape(N2, group_size), bits=bits, round_zero=False)
    t = torch.arange(N, device=v.device) // group_size
    codes = quantize_codes(v, scale2[t], zero2[t], bits=bits).long()
    decoded = scale2[t] * (codes.to(torch.float32) - zero2[t])
    return codes, torch.stack([scale2, zero2], dim=-1), decoded


def fit_group_grid(w: torch.Tensor, *, bits: int, stat_bits: int, stat_group_size: int) -> GroupGrid:
    """Min-max asymmetric grid of one group `w [N, g]` per row (the reference's `Quantizer.find_params`, round_zero
    off), with the statistics quantized and decoded exactly as stored (see the module docstring)."""
    if stat_bits == 0:
        scale, zero = minmax_params(w, bits=bits, round_zero=False)
        return GroupGrid(scale=scale, zero=zero, scale_stored=scale, zero_stored=zero)
    xmin, xmax = _minmax_range(w.float())
    scale1 = (xmax - xmin) / (2**bits - 1)
    zero1 = (-xmin / scale1).clamp(-FP16_MAX, FP16_MAX)
    scale_codes, scale_stats, scale = _quantize_stat(scale1, bits=stat_bits, group_size=stat_group_size)
    zero_codes, zero_stats, zero = _quantize_stat(zero1, bits=stat_bits, group_size=stat_group_size)
    return GroupGrid(
        scale=scale,
        zero=zero,
        scale_stored=scale_codes,
        zero_stored=zero_codes,
        stats2=torch.cat([scale_stats, zero_stats], dim=-1),
    )


def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale.clamp_min(_EPS) + zero), 0, maxq)
    return scale * (q - zero)


def leave_one_out_reduction(w: torch.Tensor, diag_u: torch.Tensor, *, bits: int) -> torch.Tensor:
    """The reference's `get_leave_one_out_error`: how much the Hessian-weighted squared error of a row of the group
    `w [N, g]` drops when weight `i` is left out of the min-max fit and not quantized (fp32 statistics).

    Args:
        w: the group's current weights `[N, g]`.
        diag_u: `[g]` diagonal of the upper Cholesky factor of H⁻¹ at the group's columns.

    Returns:
        float32 `[N, g]`: baseline error − leave-one-out error.
    """
    maxq = 2**bits - 1
    N, g = w.shape
    xmin, xmax = _minmax_range(w)
    scale = (xmax - xmin) / maxq
    zero = -xmin / scale
    base = _quantize_dequantize(w, scale[:, None], zero[:, None], maxq)
    base_err = ((base - w) / diag_u).square().sum(dim=1, keepdim=True)  # [N, 1]
    if g == 1:  # nothing is left to quantize
        return base_err.expand(N, 1).clone()
    # min/max without column i: the second extreme where i holds the extreme, the extreme elsewhere
    cols = torch.arange(g, device=w.device)
    lo, lo_at = w.topk(2, dim=1, largest=False)
    hi, hi_at = w.topk(2, dim=1, largest=True)
    min_loo = torch.where(cols == lo_at[:, :1], lo[:, 1:2], lo[:, :1])  # [N, g]
    max_loo = torch.where(cols == hi_at[:, :1], hi[:, 1:2], hi[:, :1])
    same = min_loo == max_loo
    pad = torch.where(min_loo == 0, torch.ones_like(min_loo), min_loo.abs())
    max_loo = torch.where(same, max_loo + pad, max_loo)
    scale_loo = ((max_loo - min_loo) / maxq)[..., None]  # [N, g (left out), 1]
    zero_loo = (-min_loo[..., None]) / scale_loo
    recon = _quantize_dequantize(w[:, None, :], scale_loo, zero_loo, maxq)  # [N, g (left out), g]
    err = ((recon - w[:, None, :]) / diag_u).square()
    err = err.masked_fill(torch.eye(g, dtype=torch.bool, device=w.device), 0.0)  # the left-out weight is exact
    return base_err - err.sum(dim=-1)


# ---------------------------------------------------------------------------------------------------- the solver
def paper_avg_bits(*, bits: int, group_size: int, stat_bits: int, stat_group_size: int, outlier_share: float) -> float:
    """The paper's / reference's (`main.get_average_number_of_bits`, round_zero off) estimate of bits per weight:
    `bits + 2·stat_bits/β1 + 2·(16 + 16)/(β1·β2) + 32·outlier_share`. With fp16 statistics (stat_bits = 0) this
    is `bits + 32/β1 + 32·outlier_share` (the reference would still add the second-level term, which is not
    stored then). Ignores code/statistics padding, the outliers' row pointers and the permutation."""
    if stat_bits == 0:
        stats = 2 * 16 / group_size
    else:
        stats = 2 * stat_bits / group_size + 2 * (16 + 16) / (group_size * stat_group_size)
    return bits + stats + 32 * outlier_share


@contextlib.contextmanager
def _single_thread():
    """Run torch on one intra-op thread (restored afterwards): the column loop is thousands of `[N]`/`[N, β1]`
    ops whose threading overhead exceeds their work, and spinning OpenMP threads on a busy 2-core machine slow
    it down by orders of magnitude (measured: 1 s → 40 s for a 576×1536 layer)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def spqr_quantize_layer(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    config: SpQRConfig,
    bias: Optional[torch.Tensor] = None,
) -> LayerQuantization:
    """SpQR of one linear layer (the reference's `SPQRUtil.quantize`).

    Args:
        weight: `[N, K]` (out_features, in_features) weight; not modified.
        H: `[K, K]` input Hessian `2/n Σ x xᵀ` (symmetric positive semi-definite); not modified.
        config: the method settings.
        bias: `[N]` bias carried into the packed layer, or None.

    Returns:
        `LayerQuantization(evaluated [N, K] float32 in the original column order, packed SpQRWeight, report)`,
        with `packed.dequantize()` equal to `evaluated` bit for bit. The report is `layer_report(...)` plus
        `paper_avg_bits`, `outlier_threshold` (absolute; None at τ = ∞) and `seconds`.
    """
    with _single_thread():
        return _spqr_quantize_layer(weight, H, config=config, bias=bias)


@dataclasses.dataclass
class _Prepared:
    """What both layer solvers start from: the weight in quantization order (dead inputs zeroed), the permutation,
    the upper Cholesky factor `U` of the damped H⁻¹ and the absolute outlier threshold (inf: no outliers)."""

    W: torch.Tensor
    perm: Optional[torch.Tensor]
    U: torch.Tensor
    diag_u: torch.Tensor
    threshold: float


def _prepare(weight: torch.Tensor, H: torch.Tensor, cfg: SpQRConfig) -> _Prepared:
    W = weight.detach().to(dtype=torch.float32, copy=True)
    N, K = W.shape
    if H.shape != (K, K):
        raise QCompilerError(f"Hessian shape {tuple(H.shape)} does not match in_features {K}")
    H = H.detach().to(dtype=torch.float32, device=W.device, copy=True)
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    dead = torch.diag(H) == 0  # input features that never fire do not affect the outputs
    if cfg.percdamp > 0:
        H.diagonal().add_(cfg.percdamp * torch.diag(H).abs().mean())
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_cholesky(H)
    diag_u = torch.diag(U)
    return _Prepared(W=W, perm=perm, U=U, diag_u=diag_u, threshold=_threshold(W, diag_u, cfg))


def _threshold(W: torch.Tensor, diag_u: torch.Tensor, cfg: SpQRConfig) -> float:
    """τ in absolute units: τ · mean_j(var_n(W[:, j]) / U_jj²); inf without outliers."""
    if cfg.outlier_threshold == float("inf"):
        return float("inf")
    return cfg.outlier_threshold * (W.var(dim=0) / diag_u.square()).mean().item()


def _fit_grid(group: torch.Tensor, diag_u: torch.Tensor, cfg: SpQRConfig, threshold: float) -> GroupGrid:
    """The grid of one group fit on its current weights `[N, g]`, after the leave-one-out outlier pre-detection
    (unless simplified or without outliers)."""
    if threshold != float("inf") and not cfg.simplified_outliers:
        likely = leave_one_out_reduction(group, diag_u, bits=cfg.bits) > threshold
        keep = (~likely).to(torch.float32)
        mean_kept = (group * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        group = torch.where(likely, mean_kept, group)
    return fit_group_grid(group, bits=cfg.bits, stat_bits=cfg.stat_bits, stat_group_size=cfg.stat_group_size)


def _spqr_quantize_layer(
    weight: torch.Tensor, H: torch.Tensor, *, config: SpQRConfig, bias: Optional[torch.Tensor]
) -> LayerQuantization:
    tick = time.perf_counter()
    cfg = config
    prep = _prepare(weight, H, cfg)
    W, U, diag_u, threshold = prep.W, prep.U, prep.diag_u, prep.threshold
    N, K = W.shape
    maxq = 2**cfg.bits - 1
    gs = cfg.group_size
    outliers_on = threshold != float("inf")

    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    deltas = torch.zeros(N, K, dtype=torch.float32, device=W.device)  # fp16-exact additive outlier values, stored order
    grids: list[GroupGrid] = []
    grid: Optional[GroupGrid] = None

    d = diag_u.tolist()  # python floats (fp32 values): dividing by them is the same fp32 division, minus an op
    for b0 in range(0, K, cfg.block_size):
        b1 = min(b0 + cfg.block_size, K)
        W1 = W[:, b0:b1].clone()  # the block, updated column by column (contiguous: faster rank-1 updates)
        U1 = U[b0:b1, b0:b1]
        errors = torch.empty(N, b1 - b0, dtype=torch.float32, device=W.device)
        for i in range(b1 - b0):
            j = b0 + i
            if j % gs == 0:
                # fit the group's grid on the current weights of its columns, across all rows (as the reference:
                # columns past the block, if the group straddles it, do not have this block's updates yet)
                group = W1[:, i : i + gs]
                if j + gs > b1 and b1 < K:
                    group = torch.cat([group, W[:, b1 : j + gs]], dim=1)
                grid = _fit_grid(group, diag_u[j : j + gs], cfg, threshold)
                grids.append(grid)
                scale, zero, safe_scale = grid.scale, grid.zero, grid.scale.clamp_min(_EPS)
            w = W1[:, i]
            q = torch.round(w / safe_scale + zero).clamp_(0, maxq)
            value = scale * (q - zero)  # the op's dense decode, fp32
            err = (w - value) / d[j]
            if outliers_on:
                is_outlier = err.square() > threshold
                if bool(is_outlier.any()):
                    delta = torch.where(is_outlier, to_fp16_grid(w - value), 0.0)
                    deltas[:, j] = delta
                    value = value + delta  # what the op evaluates: dense + f32(fp16 delta)
                    err = (w - value) / d[j]
            codes[:, j] = q
            W1[:, i] = value
            errors[:, i] = err
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
        W[:, b0:b1] = W1
        W[:, b1:].addmm_(errors, U[b0:b1, b1:], alpha=-1.0)  # lazy batch update of the columns after the block

    return _pack(weight, W, codes, deltas if outliers_on else None, grids, prep, cfg, bias, tick)


def spqr_round_layer(weight: torch.Tensor, H: torch.Tensor, *, config: SpQRConfig,
                     cache: Optional[dict] = None) -> LayerQuantization:
    """SpQR's format without the error feedback: every group's grid fit, outliers chosen and codes rounded on the
    original weights, a group at a time (no column loop). The sensitivity probe of `--target-bits` uses it to
    rank settings (qcompiler/quantize/sensitivity.py); same result type, with `packed.dequantize()` equal to
    `evaluated` bit for bit. `cache`: a dict kept across calls on the same `weight` and `H` (the permutation and
    the Cholesky factor are computed once per input order and damping)."""
    with _single_thread():
        tick = time.perf_counter()
        cfg = config
        key = (cfg.act_order, cfg.percdamp)
        if cache is not None and key in cache:
            base = cache[key]
            prep = _Prepared(W=base.W.clone(), perm=base.perm, U=base.U, diag_u=base.diag_u,
                             threshold=_threshold(base.W, base.diag_u, cfg))
        else:
            prep = _prepare(weight, H, cfg)
            if cache is not None:
                cache[key] = dataclasses.replace(prep, W=prep.W.clone())
        W, diag_u, threshold = prep.W, prep.diag_u, prep.threshold
        N, K = W.shape
        maxq = 2**cfg.bits - 1
        outliers_on = threshold != float("inf")
        codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
        deltas = torch.zeros(N, K, dtype=torch.float32, device=W.device)
        grids: list[GroupGrid] = []
        for j0 in range(0, K, cfg.group_size):
            j1 = min(j0 + cfg.group_size, K)
            w = W[:, j0:j1]
            grid = _fit_grid(w, diag_u[j0:j1], cfg, threshold)
            grids.append(grid)
            scale, zero = grid.scale[:, None], grid.zero[:, None]
            q = torch.round(w / grid.scale.clamp_min(_EPS)[:, None] + zero).clamp_(0, maxq)
            value = scale * (q - zero)
            if outliers_on:
                is_outlier = ((w - value) / diag_u[j0:j1]).square() > threshold
                delta = torch.where(is_outlier, to_fp16_grid(w - value), 0.0)
                deltas[:, j0:j1] = delta
                value = value + delta
            codes[:, j0:j1] = q
            W[:, j0:j1] = value
        return _pack(weight, W, codes, deltas if outliers_on else None, grids, prep, cfg, None, tick)


def _pack(weight: torch.Tensor, W: torch.Tensor, codes: torch.Tensor, deltas: Optional[torch.Tensor],
          grids: list[GroupGrid], prep: _Prepared, cfg: SpQRConfig, bias: Optional[torch.Tensor],
          tick: float) -> LayerQuantization:
    """The layer in `SpQRMatMul` form, its evaluated weight in the original column order and its report."""
    N, K = W.shape
    assert len(grids) == math.ceil(K / cfg.group_size)
    scales = torch.stack([g.scale_stored for g in grids], dim=1).cpu().numpy()  # [N, G]
    zeros = torch.stack([g.zero_stored for g in grids], dim=1).cpu().numpy()
    stats2 = None
    if cfg.stat_bits == 0:
        scales, zeros = scales.astype(np.float16), zeros.astype(np.float16)  # exact: fp16-representable values
    else:
        stats2 = torch.stack([g.stats2 for g in grids], dim=0).cpu().numpy().astype(np.float16)  # [G, N2, 4]
    perm = prep.perm
    perm_np = None
    if perm is not None and not torch.equal(perm, torch.arange(K, device=perm.device)):
        perm_np = perm.cpu().numpy()
    packed = SpQRWeight.from_codes(
        codes=codes.cpu().numpy(),
        bits=cfg.bits,
        group_size=cfg.group_size,
        scales=scales,
        zeros=zeros,
        stat_bits=cfg.stat_bits,
        stat_group_size=cfg.stat_group_size,
        stats2=stats2,
        outliers=deltas.cpu().numpy() if deltas is not None else None,
        perm=perm_np,
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
    )
    evaluated = W
    if perm is not None:
        evaluated = torch.empty_like(W)
        evaluated[:, perm] = W
    report = layer_report(weight, evaluated, packed)
    report["paper_avg_bits"] = paper_avg_bits(
        bits=cfg.bits,
        group_size=cfg.group_size,
        stat_bits=cfg.stat_bits,
        stat_group_size=cfg.stat_group_size,
        outlier_share=report["outlier_share"],
    )
    report["outlier_threshold"] = prep.threshold if deltas is not None else None  # absolute: τ · outlier scale
    report["seconds"] = time.perf_counter() - tick
    return LayerQuantization(evaluated=evaluated, packed=packed, report=report)


# ---------------------------------------------------------------------------------------------------- the method
@register_method("spqr")
class SpQR(Method):
    """SpQR: GPTQ error feedback with small groups, 3-bit bilevel statistics and fp16 unstructured outliers.

    Per decoder layer (true-sequential groups of linears), the input Hessian of each linear is accumulated over the
    calibration windows and `spqr_quantize_layer` replaces the weight by its evaluated weight; the result carries
    every layer in `SpQRMatMul` form (codes, quantized statistics, CSR outliers, act-order permutation).
    """

    Config = SpQRConfig
    needs_calibration = True
    memory_offload_param_factor = 0.75  # as RTN's (qcompiler/quantize/methods/rtn.py)
    presets = {
        # the reference's near-lossless setting (the defaults): 4-bit codes, β1=β2=16, 3-bit statistics, τ=0.2
        "near-lossless": {"bits": 4},
        # 3-bit codes under 3.9 stored bits/parameter: the reference's w3 setting (τ=0.2, β2=16) keeps ~1.8 %
        # outliers on SmolLM2-135M, 4.29 bits; β2=32 and τ=0.3 keep ~0.86 %, 3.87 bits (bench/results)
        "sub4": {"bits": 3, "stat_group_size": 32, "outlier_threshold": 0.3},
    }

    @classmethod
    def default_accuracy_level(cls, config: SpQRConfig, *, lm_head: bool = False) -> int:
        # SmolLM2-135M, WikiText-2 40 × 512 (bench/results/peers-2026-12-06-int8x16.md, int8 X per 16 columns):
        # 4-bit codes (near-lossless) cost +0.32 % with the fp32 lm_head and +0.48 % with the 4-bit one. 3-bit codes
        # (sub4): +0.34 % with the fp32 lm_head (bench/results/quality-2026-12-06-int8x16.md) but +0.62 % with the
        # 4-bit one (peers-2026-12-06-int8x16.md); 2-bit codes and --target-bits mixes: not measured
        if config.target_bits is not None:
            return 0
        if config.bits >= 4:
            return 4
        return 4 if config.bits == 3 and not lm_head else 0

    @classmethod
    def default_lm_head(cls, config: SpQRConfig) -> Optional[str]:
        # 4-bit codes (near-lossless, int8 X): the 8-bit rtn table measured lossless and faster, SmolLM2-135M on the
        # AVX2 VM (bench/results/peers-2026-12-07-head8.md): 31.027 against 31.034 perplexity with the fp32 table,
        # decode 1.43× / 1.57× (1 / 2 threads), session memory 132 against 235 MB, folder 94.5 against 178.5 MB.
        # 3-bit codes: their int8 default holds only without a quantized head (default_accuracy_level), so no head.
        # --target-bits mixes (fp32 activations): the 8-bit table is lossless whatever the decoder — 29.168 against
        # 29.188 with the fp32 decoder (bench/results/lm-head-probe-2026-12-07.md), 30.860 against 30.880 with the
        # near-lossless one in ONNX Runtime (peers-2026-12-07-level0.md) —, and it puts the embedding/lm_head at
        # 8.25 bits like the GGUFs' Q8_0 token_embd (bench/results/pareto-*.md, "all tensors").
        if config.target_bits is not None:
            return "rtn"
        return "rtn" if config.bits >= 4 else None

    def quantize(
        self,
        model: torch.nn.Module,
        family,
        *,
        calibration: Optional[Sequence[torch.Tensor]] = None,
        progress: bool = True,
        device: Optional[torch.device] = None,
    ) -> QuantizationResult:
        if not calibration:
            raise QCompilerError("spqr needs calibration data (token windows)")
        cfg = self.config
        if cfg.target_bits is not None:
            return self._quantize_to_target(model, family, calibration, progress=progress, device=device)

        def solve(path: str, linear: torch.nn.Linear, H: torch.Tensor) -> LayerQuantization:
            result = spqr_quantize_layer(linear.weight.detach(), H, config=cfg, bias=linear.bias)
            r = result.report
            log.info(
                "%s [%dx%d]: rel error %.4f, outliers %.3f%%, %.3f bits (paper formula %.3f), %.1fs",
                path, r["N"], r["K"], r["rel_error"], 100 * r["outlier_share"], r["avg_bits"],
                r["paper_avg_bits"], r["seconds"],
            )
            return result

        desc = f"spqr w{cfg.bits} g{cfg.group_size} s{cfg.stat_bits}/{cfg.stat_group_size} tau {cfg.outlier_threshold}"
        result = quantize_blockwise(
            model, family, calibration, solve, true_sequential=cfg.true_sequential, progress=progress, desc=desc,
            parallel_solves=max(1, torch.get_num_threads()), device=device,
        )
        result.config = {"method": self.name, **dataclasses.asdict(cfg)}
        t = result.totals
        log.info(
            "spqr: %d layers, %.3f bits/weight, mean rel error %.4f, outliers %.3f%%",
            t["layers"], t["avg_bits"], t["rel_error"], 100 * t["outlier_share"],
        )
        return result

    def _quantize_to_target(self, model: torch.nn.Module, family, calibration: Sequence[torch.Tensor], *,
                            progress: bool, device: Optional[torch.device] = None) -> QuantizationResult:
        """`--target-bits`: probe every linear under each menu setting, then SpQR layer by layer with the setting
        the closed-loop budget gives it (qcompiler/quantize/allocation.py, sensitivity.py)."""
        from qcompiler.quantize.allocation import MENU, BitBudget, describe, layer_prefix
        from qcompiler.quantize.sensitivity import load_probe, probe, probe_key, probe_record, weighted_error

        cfg = self.config
        configs = [dataclasses.replace(cfg, target_bits=None, sensitivity=None, **choice.settings) for choice in MENU]
        # each setting's reference: the one of the same input order that SpQR proper runs on
        refs = {c.act_order: i for i, (c, choice) in enumerate(zip(configs, MENU)) if choice.reference}
        reference = [refs.get(c.act_order, i) for i, c in enumerate(configs)]

        def measure(path: str, linear: torch.nn.Linear, H: torch.Tensor, fisher: torch.Tensor):
            W = linear.weight.detach().float()
            costs, bits = np.zeros(len(configs)), np.zeros(len(configs))
            cache: dict = {}
            for i, c in enumerate(configs):  # without the leave-one-out fits: they would cost more than the rest
                r = spqr_round_layer(W, H, config=dataclasses.replace(c, simplified_outliers=True), cache=cache)
                costs[i] = weighted_error(W - r.evaluated, H, fisher)
                bits[i] = sum(r.packed.stored_bits().values())
            for i in sorted(set(reference)):  # SpQR's error feedback lowers the cost by a per-linear factor
                full = spqr_quantize_layer(W, H, config=dataclasses.replace(configs[i], simplified_outliers=True))
                ratio = weighted_error(W - full.evaluated, H, fisher) / costs[i] if costs[i] > 0 else 1.0
                for j, ref in enumerate(reference):
                    if ref == i:
                        costs[j] *= ratio
            return costs, bits

        parallel = max(1, torch.get_num_threads())
        key = probe_key(model, family, calibration, settings=[dataclasses.asdict(c) for c in configs])
        if cfg.sensitivity is not None:
            found = load_probe(cfg.sensitivity, key, model, family)
            log.info("spqr: sensitivity probe reused from %s", found.source)
        else:
            found = probe(model, family, calibration, measure, progress=progress, parallel_solves=parallel,
                          device=device)
        budget = BitBudget(found.options, target_bits=float(cfg.target_bits),
                           layer_of=lambda path: layer_prefix(path, family.layers), names=[c.name for c in MENU])

        def solve(path: str, linear: torch.nn.Linear, H: torch.Tensor) -> LayerQuantization:
            c = budget.choice_for(path)
            result = spqr_quantize_layer(linear.weight.detach(), H, config=configs[c], bias=linear.bias)
            result.report["setting"] = MENU[c].name
            budget.record(path, c, sum(result.packed.stored_bits().values()))
            r = result.report
            log.info("%s [%dx%d]: %s, rel error %.4f, outliers %.3f%%, %.3f bits, %.1fs", path, r["N"], r["K"],
                     MENU[c].name, r["rel_error"], 100 * r["outlier_share"], r["avg_bits"], r["seconds"])
            return result

        result = quantize_blockwise(
            model, family, calibration, solve, true_sequential=cfg.true_sequential, progress=progress,
            desc=f"spqr target {cfg.target_bits:g} bits", parallel_solves=parallel, device=device,
        )
        summary = budget.summary()
        result.config = {"method": self.name, **dataclasses.asdict(cfg),
                         "allocation": {**summary, "menu": {c.name: c.settings for c in MENU},
                                        "probe_seconds": found.seconds if found.source is None else {},
                                        "probe_from": found.source, "probe": probe_record(found, key)}}
        log.info("spqr: %s", describe(summary))
        return result
