"""GPTQ (Frantar et al. 2022; reference implementation IST-DASLab/gptq `gptq.py`, `GPTQ.fasterquant`).

Each linear `W [N, K]` is quantized one input feature (column) at a time; the error of a quantized column is
spread over the columns not yet quantized through the Cholesky factor of the inverse Hessian
`H⁻¹ = (2/n Σ x xᵀ)⁻¹`, so that the layer's output error `‖X Wᵀ − X Ŵᵀ‖` rather than the weight error is
minimized. Updates are applied lazily per block of columns. The grid is RTN's asymmetric min-max grid
(`minmax_params`) per group of `group_size` stored columns, fitted on the error-updated weights when the loop
reaches the group's first column.

Where this module differs from the reference, on purpose:

- Exactness: the grid's scale and zero are rounded to fp16 (what `SpQRMatMul` stores) before the codes are chosen,
  and the column whose error is propagated is `scale · (q − zero)` in fp32: the evaluated weight is exactly
  `SpQRWeight.dequantize()` of the packed layer.
- Block boundaries are aligned to group boundaries (the effective block is the largest multiple of `group_size`
  not above `block_size`, or one group if groups are larger), so a group's grid is always fitted on fully updated
  weights. The reference reads the group from the not-yet-updated copy of the weight when a group starts inside a
  block (groups smaller than the block), i.e. without the updates of the block's earlier columns.
- The permutation (act_order: decreasing Hessian diagonal, stable sort) is kept as the op's `perm` input, and groups
  are contiguous in the permuted (stored) order, as the op defines them (the reference's default, not its
  `static_groups` variant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Iterator, Optional, Sequence

import torch

from qcompiler import QCompilerError
from qcompiler.quantize.calibration import LayerQuantization, quantize_blockwise
from qcompiler.models.families import Family
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.base import (
    Method,
    QuantizationResult,
    check_bits,
    check_group_size,
    dequantize_groups,
    layer_report,
    minmax_params,
    quantize_codes,
    to_spqr_weight,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """Settings of `GPTQ`.

    Attributes:
        bits: code width of the weights, 2, 3, 4 or 8.
        group_size: stored columns (input features, in act_order's permuted order) per scale/zero group; the last
            group may be ragged.
        act_order: quantize input features in order of decreasing Hessian diagonal (stored as the op's `perm`).
        percdamp: damping added to the Hessian diagonal, relative to its mean (IST-DASLab gptq: 0.01).
        block_size: columns per lazy-batch update block (speed only; aligned to groups, see the module docstring).
        true_sequential: quantize the linears of a decoder layer group by group (q/k/v, o, gate/up, down), each
            group calibrated on the outputs of the already quantized ones.
        stat_bits: 0 = fp16 scale and zero (the only setting GPTQ supports; quantized statistics are `--method spqr`).
        round_zero: integer zero points with the range widened to include 0 (GPTQ's quantizer); False: exact
            per-group [min, max] range with a real-valued fp16 zero.
    """

    bits: int = dataclasses.field(default=4, metadata={"help": "weight code width: 2, 3, 4 or 8"})
    group_size: int = dataclasses.field(default=128, metadata={"help": "input features per scale/zero group"})
    act_order: bool = dataclasses.field(
        default=True, metadata={"help": "quantize input features by decreasing Hessian diagonal"}
    )
    percdamp: float = dataclasses.field(
        default=0.01, metadata={"help": "Hessian damping relative to the mean diagonal (gptq: 0.01)"}
    )
    block_size: int = dataclasses.field(default=128, metadata={"help": "columns per lazy-batch update block"})
    true_sequential: bool = dataclasses.field(
        default=True, metadata={"help": "quantize a layer's linears group by group on already-quantized inputs"}
    )
    stat_bits: int = dataclasses.field(
        default=0, metadata={"help": "code width of the group scales/zeros (gptq: 0 = fp16 only)"}
    )
    round_zero: bool = dataclasses.field(
        default=True, metadata={"help": "integer zero points, range includes 0 (GPTQ); --no-round-zero: exact min-max"}
    )

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not (isinstance(self.percdamp, (int, float)) and self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise QCompilerError(f"percdamp must be a finite number >= 0 (got {self.percdamp})")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise QCompilerError(f"block_size must be a positive integer (got {self.block_size})")
        if self.stat_bits != 0:
            raise QCompilerError(
                f"gptq stores fp16 scales/zeros only: stat_bits must be 0 (got {self.stat_bits}); "
                "quantized statistics are available with --method spqr"
            )


# ---------------------------------------------------------------------------------------------------- one layer
def inverse_hessian_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), float32 `[K, K]`; `H` must be positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise QCompilerError(
            "the damped Hessian is not positive definite (Cholesky failed); increase --percdamp"
        )
    return L


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the column loop on one intra-op thread: its operations are too small to gain from more, and on a busy
    machine thread synchronization made it 4-5x slower (576x1536 layer: 0.9 s vs 4.8 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_step(block_size: int, group_size: int) -> int:
    """Lazy-update block width aligned to groups: a multiple of `group_size` ≤ `block_size`, or one group."""
    return max(1, block_size // group_size) * group_size


def gptq_quantize_layer(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    act_order: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    round_zero: bool = True,
    bias: Optional[torch.Tensor] = None,
) -> LayerQuantization:
    """GPTQ of one linear layer.

    Args:
        weight: `[N, K]` (out_features, in_features); not modified.
        H: `[K, K]` Hessian of the layer inputs, `2/n Σ x xᵀ` (symmetric positive semi-definite); not modified.
        bits: code width, 2-4.
        group_size: stored (permuted) columns per scale/zero group; the last group may be ragged.
        act_order: process columns by decreasing `diag(H)`; the order is stored as the op's `perm`.
        percdamp: `percdamp · mean(diag H)` is added to the diagonal before inversion.
        block_size: lazy-batch block width (aligned to groups).
        round_zero: grid as `minmax_params(round_zero=...)`.
        bias: `[N]` carried into the packed layer, or None.

    Returns:
        `LayerQuantization(evaluated [N, K] float32 in the original column order, packed SpQRWeight, report)` with
        `packed.dequantize()` equal to `evaluated` bit for bit. The report is `layer_report(...)` plus `loss`
        (GPTQ's proxy of the output error: `Σ (w − ŵ)² / (2 U_jj²)`) and `seconds`.

    Dead input features (`H_jj = 0`) get weight 0 before quantization, as in the reference.
    """
    with _single_thread():
        return _gptq_quantize_layer(weight, H, bits=bits, group_size=group_size, act_order=act_order,
                                    percdamp=percdamp, block_size=block_size, round_zero=round_zero, bias=bias)


def _gptq_quantize_layer(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    act_order: bool,
    percdamp: float,
    block_size: int,
    round_zero: bool,
    bias: Optional[torch.Tensor],
) -> LayerQuantization:
    check_bits(bits)
    check_group_size(group_size)
    tick = time.perf_counter()
    W = weight.detach().to(dtype=torch.float32, copy=True)
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise QCompilerError(f"Hessian shape {tuple(H.shape)} does not match the weight's {K} input features")
    H = H.detach().to(dtype=torch.float32, device=W.device, copy=True)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    U = inverse_hessian_cholesky(H)
    del H

    G = math.ceil(K / group_size)
    codes = torch.empty((N, K), dtype=torch.uint8, device=W.device)
    scale = torch.empty((N, G), dtype=torch.float32, device=W.device)
    zero = torch.empty((N, G), dtype=torch.float32, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    step = _block_step(block_size, group_size)
    for b0 in range(0, K, step):
        b1 = min(b0 + step, K)
        W1 = W[:, b0:b1].clone()  # contiguous copy: faster rank-1 updates
        U1 = U[b0:b1, b0:b1]
        err = torch.empty((N, b1 - b0), dtype=torch.float32, device=W.device)
        for i in range(b1 - b0):
            j = b0 + i
            if j % group_size == 0:  # the group lies inside this block: fit on the updated weights
                g = j // group_size
                s, z = minmax_params(W1[:, i : i + group_size], bits=bits, round_zero=round_zero)
                scale[:, g], zero[:, g] = s, z
            w = W1[:, i]
            q = quantize_codes(w, s, z, bits=bits)
            w_q = s * (q.to(torch.float32) - z)  # exactly dequantize_groups' arithmetic
            codes[:, j] = q
            e = (w - w_q) / U1[i, i]
            loss += e.double().square().sum() / 2
            W1[:, i + 1 :].addr_(e, U1[i, i + 1 :], alpha=-1.0)
            err[:, i] = e
        W[:, b1:].addmm_(err, U[b0:b1, b1:], alpha=-1.0)

    stored = dequantize_groups(codes, scale, zero, group_size)
    evaluated = stored
    if perm is not None:
        evaluated = torch.empty_like(stored)
        evaluated[:, perm] = stored
    packed = to_spqr_weight(codes, scale, zero, bits=bits, group_size=group_size, bias=bias, perm=perm)
    report = layer_report(weight, evaluated, packed)
    report["loss"] = float(loss)
    report["seconds"] = time.perf_counter() - tick
    return LayerQuantization(evaluated=evaluated, packed=packed, report=report)


# ---------------------------------------------------------------------------------------------------- method
@register_method("gptq")
class GPTQ(Method):
    """GPTQ with fp16 group statistics on the block-sequential calibration engine (qcompiler/quantize/calibration.py)."""

    Config = GPTQConfig
    needs_calibration = True
    memory_offload_param_factor = 0.75  # as RTN's (qcompiler/quantize/methods/rtn.py)

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
        if not calibration:
            raise QCompilerError("gptq needs calibration data (token windows)")

        def solve(path: str, linear: torch.nn.Linear, H: torch.Tensor) -> LayerQuantization:
            return gptq_quantize_layer(
                linear.weight,
                H,
                bits=cfg.bits,
                group_size=cfg.group_size,
                act_order=cfg.act_order,
                percdamp=cfg.percdamp,
                block_size=cfg.block_size,
                round_zero=cfg.round_zero,
                bias=linear.bias,
            )

        result = quantize_blockwise(
            model,
            family,
            calibration,
            solve,
            true_sequential=cfg.true_sequential,
            progress=progress,
            desc=f"gptq {cfg.bits}-bit g{cfg.group_size}",
            device=device,
        )
        result.config = {"method": self.name, **dataclasses.asdict(cfg)}
        return result
