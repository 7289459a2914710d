"""AffineQuant (Ma et al., ICLR 2024; reference implementation bytedance/AffineQuant `quantize/affinequant.py`,
`models/transformation.py`, OmniQuant's `quantize/quantizer.py`).

Decoder layer by decoder layer, learnable invertible transforms and learnable weight clipping (LWC) are trained so
that the quantized layer, fed the outputs of the already quantized layers, reproduces the full-precision layer's
output on the full-precision inputs (MSE; `aug_loss` adds the full-precision layer on the quantized inputs):

- norm → q/k/v and norm → gate/up (fc1): `x̃ = (norm(x) − δ) Â⁻¹`, `W' = W Âᵀ` (PyTorch layout), `b' = b + W δ`;
  `Â` a vector (default) or a full matrix (`ln_matrix`); shifts `δ` only where the norm has a bias (OPT);
- v → o: one `[d, d]` block per KV head, `v' = v Â⁻¹`, `W_o' = W_o Âᵀ` (GQA: the block of a KV head is repeated for
  the query heads that read it; the reference has one block per query head and does not run GQA models);
- gradual mask: in epoch `e` of `E`, `Â = A ∘ M_e` with `M_e` 1 on the diagonal, `sf` on the off-diagonals within
  `n(e) = ⌊(D − 1)/(E − 1) · e⌋ + 1` of it, 0 elsewhere (D = hidden size, or head dim for v → o);
- LWC: per group of `group_size` inputs, `xmax = σ(γ_up)·max`, `xmin = σ(γ_low)·min` (γ initialized to 4), asymmetric
  grid with an integer zero, rounding with a straight-through estimator.

After each layer the transforms are merged with the functions of `qcompiler.graph.fold` (the same ones the graph passes
use) and the transformed weights are quantized with the learned clipping. The export then carries the transforms
as explicit nodes next to the full-precision weights, and the passes fold them (qcompiler/quantize/transforms.py).

Deliberate differences from the reference:

- Inverses in float64 (reference: fp32), fp32 training without autocast (the reference trains under fp16 autocast).
- Strict diagonal dominance of every `Â` is enforced after each step (off-diagonals of a row are scaled down to
  99 % of the diagonal's magnitude), so each transform stays invertible (Levy–Desplanques); the reference relies on
  a small `sf`. Only diagonal entries are kept at magnitude ≥ 0.01 (the reference's `truncate_number` also pushes
  small off-diagonal entries up to ±0.01).
- Initial scales use `max |W|` per input channel (the reference takes the signed max, an inherited OmniQuant bug);
  act statistics are the max |x| over this run's calibration windows.
- No q/k transform: with RoPE between the projections and the dot product it is not an exact rewrite for LLaMA-like
  models. No v → o shift (the reference trains one for OPT).
- LWC's scale is clamped to ≥ 1e-5 (the reference's copy overwrites its clamp) and ragged last groups are allowed
  (the reference zero-pads, which it only permits for symmetric grids). The stored scale is rounded to fp16.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional

import torch
from torch.func import functional_call

from qcompiler import QCompilerError
from qcompiler.graph import fold
from qcompiler.models import offload
from qcompiler.graph.actquant import install_act_quant
from qcompiler.quantize.calibration import calibration_mode, layer_output, capture_layer_inputs
from qcompiler.models.offload import keep, keep_arrays, store_numel
from qcompiler.models.preflight import check_finite
from qcompiler.models.families import Family, get_module, iter_layers, layer_linears
from qcompiler.quantize.transforms import AffineTransforms, HeadTransform, NormTransform, TransformPlan, head_pair
from qcompiler.quantize.methods import register_method
from qcompiler.quantize.methods.base import (
    Method,
    QuantizationResult,
    check_bits,
    check_group_size,
    dequantize_groups,
    layer_report,
    quantize_codes,
    to_fp16_grid,
    to_spqr_weight,
)

log = logging.getLogger("qcompiler.affinequant")
DOMINANCE = 0.99  # off-diagonal row sum ≤ DOMINANCE · |diagonal|
MIN_DIAG = 1e-2
# LWC zero points are integers but not limited to [0, maxq] (a clipped range need not contain 0: an all-positive group
# has a negative zero), as the reference's clamp to ±1e4; ±2048 keeps them exact in the op's fp16 zeros.
ZERO_LIMIT = 2048.0
INITS = ("smoothquant", "identity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AffineQuantConfig:
    """Settings of `AffineQuant` (defaults: the reference's LLaMA w4a16g128 script, diagonal norm transforms).

    Attributes:
        bits: weight code width, 2, 3, 4 or 8.
        group_size: input features per LWC / scale-zero group (0: one group per row).
        epochs: training epochs per decoder layer (reference: 20; 40 for 2-bit).
        let_lr: learning rate of the transforms and shifts (AdamW).
        lwc_lr: learning rate of the clipping factors.
        wd: AdamW weight decay.
        init: initial transforms: "smoothquant" (the reference: diagonal `s = act^α / w^(1−α)`) or "identity"
            (the transforms start as the unquantized layer's own weights and are learned from there).
        alpha: SmoothQuant exponent of the initial scales `s = act^α / w^(1−α)`.
        sf: stability factor, the mask value of in-band off-diagonal entries.
        ln_matrix: full `[K, K]` norm → linears matrices (kept as a MatMul after the norm in the graph).
        aug_loss: add the MSE to the full-precision layer applied to the quantized inputs.
        batch_size: calibration windows per optimizer step.
        let: learn the transforms (False: LWC only, identity transforms).
        lwc: learn the clipping (False: plain min-max grid).
        abits: activation bits: 16 = weights only; 4 or 8 = dynamic per-token asymmetric fake quantization of every
            quantized linear's input (w4a4), in training, in the merged model and in the graph (qcompiler/graph/actquant.py).
    """

    bits: int = dataclasses.field(default=4, metadata={"help": "weight code width: 2, 3, 4 or 8"})
    group_size: int = dataclasses.field(default=128, metadata={"help": "input features per group (0: per row)"})
    epochs: int = dataclasses.field(default=20, metadata={"help": "training epochs per decoder layer"})
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
    let: bool = dataclasses.field(default=True, metadata={"help": "learn the affine transforms"})
    lwc: bool = dataclasses.field(default=True, metadata={"help": "learn the weight clipping"})
    abits: int = dataclasses.field(default=16, metadata={"help": "activation bits (16: off; 4: w4a4, per token)"})

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != 0:
            check_group_size(self.group_size)
        if self.epochs < 0:
            raise QCompilerError(f"epochs must be ≥ 0 (got {self.epochs})")
        if self.batch_size < 1:
            raise QCompilerError(f"batch size must be ≥ 1 (got {self.batch_size})")
        if not self.sf > 0:
            raise QCompilerError(f"sf must be > 0 (got {self.sf})")
        if self.init not in INITS:
            raise QCompilerError(f"init must be one of {', '.join(INITS)} (got {self.init!r})")
        if self.abits not in (4, 8, 16):
            raise QCompilerError(f"abits must be 4, 8 or 16 (off) (got {self.abits})")


# ---------------------------------------------------------------------------------------------------- pieces
def band_mask(D: int, band: int, sf: float) -> torch.Tensor:
    """`[D, D]`: 1 on the diagonal, `sf` where `0 < |i − j| < band`, 0 elsewhere."""
    i = torch.arange(D)
    dist = (i[:, None] - i[None, :]).abs()
    return torch.where(dist == 0, torch.ones(()), torch.where(dist < band, torch.full((), sf), torch.zeros(())))


def band_at(D: int, epoch: int, epochs: int) -> int:
    """The reference's band width `⌊(D − 1)/(E − 1) · e⌋ + 1` (one epoch: the diagonal only)."""
    return 1 if epochs <= 1 else int((D - 1) / (epochs - 1) * epoch) + 1


@torch.no_grad()
def make_dominant_(A: torch.Tensor, mask: torch.Tensor) -> None:
    """Make `A ∘ mask` strictly diagonally dominant by rows (every matrix of a batch), in place on `A`: diagonal
    magnitudes ≥ MIN_DIAG (sign kept), each row's off-diagonals scaled to at most DOMINANCE · |diagonal|."""
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0)
    diag.copy_(sign * diag.abs().clamp_min(MIN_DIAG))
    masked = (A * mask).abs()
    d = torch.diagonal(masked, dim1=-2, dim2=-1)
    off = masked.sum(-1) - d
    factor = torch.where(off > DOMINANCE * d, DOMINANCE * d / off.clamp_min(1e-30), torch.ones_like(off))
    eye = torch.eye(A.shape[-1], dtype=torch.bool)
    A.mul_(torch.where(eye, torch.ones_like(A), factor.unsqueeze(-1)))


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """`w [N, K]` as `[N, G, group_size]` (ragged last group padded with its last column: min/max unchanged)."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    pad = G * group_size - K
    wp = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1) if pad else w
    return wp.reshape(N, G, group_size), G


def lwc_params(w: torch.Tensor, up: torch.Tensor, low: torch.Tensor, bits: int, group_size: int):
    """LWC scale and integer zero per group `[N, G]` (scale ≥ 1e-5)."""
    maxq = 2**bits - 1
    g, _ = _grouped(w, group_size)
    xmax = torch.sigmoid(up) * g.amax(-1)
    xmin = torch.sigmoid(low) * g.amin(-1)
    scale = ((xmax - xmin) / maxq).clamp(1e-5, 1e4)
    zero = torch.round(-xmin / scale).clamp(-ZERO_LIMIT, ZERO_LIMIT).detach()
    return scale, zero


def lwc_fake_quant(w: torch.Tensor, up: torch.Tensor, low: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Differentiable fake quantization of `w [N, K]` with learned clipping (STE through the rounding); computed on
    `[N, G, group_size]` views (no gathers: this runs on every weight at every training step)."""
    maxq = 2**bits - 1
    N, K = w.shape
    g, G = _grouped(w, group_size)
    xmax = torch.sigmoid(up) * g.amax(-1)
    xmin = torch.sigmoid(low) * g.amin(-1)
    s = ((xmax - xmin) / maxq).clamp(1e-5, 1e4).unsqueeze(-1)
    z = torch.round(-xmin.unsqueeze(-1) / s).clamp(-ZERO_LIMIT, ZERO_LIMIT).detach()
    x = g / s
    q = torch.clamp(x + (torch.round(x) - x).detach() + z, 0, maxq)
    return ((q - z) * s).reshape(N, G * group_size)[:, :K]


# ---------------------------------------------------------------------------------------------------- one layer
class _LayerState:
    """The trainable transforms and clipping factors of one decoder layer, and how they build its weights."""

    def __init__(self, layer, layer_path: str, family: Family, cfg: AffineQuantConfig, stats: dict, heads_info):
        self.layer, self.path, self.family, self.cfg = layer, layer_path, family, cfg
        self.linears = layer_linears(layer, family)
        self.has_shift = family.norm.has_bias
        self.norms: list[dict[str, Any]] = []
        self.params_let: list[torch.Tensor] = []
        self.fp = {n: p.detach().clone() for n, p in layer.named_parameters()}
        for norm, names in family.norm_linears:
            key = names[0]
            K = self.linears[key].in_features
            s = self._init_scale(stats.get(f"{norm}.absmax"), names) if cfg.let else torch.ones(K)
            A = torch.diag(s) if cfg.ln_matrix else s.clone()
            A.requires_grad_(cfg.let)
            shift = None
            if self.has_shift:
                shift = stats.get(f"{norm}.mid", torch.zeros(K)).clone().requires_grad_(cfg.let)
            self.norms.append({"norm": norm, "linears": names, "A": A, "shift": shift})
            self.params_let += [A] + ([shift] if shift is not None else [])
        pair = head_pair(family)
        self.v, self.o = pair if pair is not None else (None, None)
        kv, self.repeat, d = heads_info
        self.heads: Optional[torch.Tensor] = None  # no value → output transform (a fused value projection)
        if pair is not None:
            s = self._head_init(stats.get("o.absmax"), kv, d) if cfg.let else torch.ones(kv, d)
            self.heads = torch.diag_embed(s).requires_grad_(cfg.let)
            self.params_let.append(self.heads)
        self.up, self.low = {}, {}
        for name, lin in self.linears.items():
            gs = cfg.group_size or lin.in_features
            G = math.ceil(lin.in_features / gs)
            self.up[name] = torch.full((lin.out_features, G), 4.0, requires_grad=cfg.lwc)
            self.low[name] = torch.full((lin.out_features, G), 4.0, requires_grad=cfg.lwc)
        self.mask_norm: Optional[torch.Tensor] = None
        self.mask_head: Optional[torch.Tensor] = None

    def _init_scale(self, act: Optional[torch.Tensor], names) -> torch.Tensor:
        w = self.fp[f"{names[0]}.weight"].abs().amax(dim=0).clamp_min(1e-5)
        if act is None or self.cfg.init == "identity":
            return torch.ones_like(w)
        a = self.cfg.alpha
        return (act.clamp_min(1e-5).pow(a) / w.pow(1 - a)).clamp_min(1e-5)

    def _head_init(self, act: Optional[torch.Tensor], kv: int, d: int) -> torch.Tensor:
        """Per-KV-head diagonal init from o_proj's input statistics (max over the query heads sharing a KV head)."""
        w = self.fp[f"{self.o}.weight"].abs().amax(dim=0).clamp_min(1e-5)  # [heads · d]
        w = w.reshape(kv, self.repeat, d).amax(1)
        if act is None or self.cfg.init == "identity":
            return torch.ones(kv, d)
        act = act.clamp_min(1e-5).reshape(kv, self.repeat, d).amax(1)
        a = self.cfg.alpha
        return (act.pow(a) / w.pow(1 - a)).clamp_min(1e-5)

    def params(self) -> list[dict]:
        groups = []
        if self.cfg.let:
            groups.append({"params": self.params_let, "lr": self.cfg.let_lr})
        if self.cfg.lwc:
            groups.append({"params": list(self.up.values()) + list(self.low.values()), "lr": self.cfg.lwc_lr})
        return groups

    def set_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        K = self.norms[0]["A"].shape[0]
        self.mask_norm = band_mask(K, band_at(K, epoch, cfg.epochs), cfg.sf) if cfg.ln_matrix else None
        if self.heads is not None:
            d = self.heads.shape[-1]
            self.mask_head = band_mask(d, band_at(d, epoch, cfg.epochs), cfg.sf)
        self.enforce()

    def enforce(self) -> None:
        with torch.no_grad():
            for n in self.norms:
                A = n["A"]
                if A.dim() == 2:
                    make_dominant_(A, self.mask_norm)
                else:
                    A.copy_(torch.where(A < 0, -1.0, 1.0) * A.abs().clamp_min(MIN_DIAG))
            if self.heads is not None:
                make_dominant_(self.heads, self.mask_head)

    def masked(self) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        norms = [n["A"] * self.mask_norm if n["A"].dim() == 2 else n["A"] for n in self.norms]
        return norms, None if self.heads is None else self.heads * self.mask_head

    def transforms(self) -> AffineTransforms:
        """The current transforms (masked, detached) with full module paths."""
        norms, heads = self.masked()
        out = AffineTransforms()
        for n, A in zip(self.norms, norms):
            out.norms.append(NormTransform(norm=f"{self.path}.{n['norm']}",
                                           linears=tuple(f"{self.path}.{x}" for x in n["linears"]),
                                           A=A.detach().clone(),
                                           shift=None if n["shift"] is None else n["shift"].detach().clone(),
                                           weight_offset=self.family.norm.weight_offset))
        if heads is not None:
            out.heads.append(HeadTransform(v=f"{self.path}.{self.v}", o=f"{self.path}.{self.o}",
                                           blocks=heads.detach().clone(), repeat=self.repeat))
        return out

    def weights(self, quantize: bool = True) -> tuple[dict[str, torch.Tensor], list]:
        """Parameters of the layer with the current transforms folded in and the weights fake-quantized
        (differentiable), for `functional_call`; plus norm hooks (ln_matrix) to install for the forward."""
        cfg = self.cfg
        fp = self.fp
        c = torch.float32  # training precision; the merge recomputes the weights in float64 (qcompiler.graph.fold)
        out: dict[str, torch.Tensor] = {}
        hooks = []
        norms, heads = self.masked()
        Wt: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        for n, A in zip(self.norms, norms):
            norm = n["norm"]
            shift = n["shift"]
            pre = None if shift is None else -shift
            bias_key = f"{norm}.bias"
            b = fp.get(bias_key)
            if A.dim() == 1:
                P = fold.inverse64(A, compute=c)
                w2, b2, _ = fold.fold_into_norm(fp[f"{norm}.weight"], b, P, pre,
                                                offset=self.family.norm.weight_offset, compute=c)
                out[f"{norm}.weight"] = w2
                if b2 is not None:
                    out[bias_key] = b2
            else:
                P = fold.inverse64(A, compute=c)
                if pre is not None and b is not None:
                    _, out[bias_key], _ = fold.fold_into_norm(fp[f"{norm}.weight"], b, torch.ones_like(b), pre,
                                                              compute=c)
                hooks.append((norm, P))
            for name in n["linears"]:
                W, bb = fold.fold_linear_input(fp[f"{name}.weight"].T, fp.get(f"{name}.bias"), A,
                                               post=None if shift is None else shift, compute=c)
                Wt[name] = (W.T, bb)
        if heads is not None:
            inv = fold.block_diag_heads(fold.blocks_inverse64(heads, compute=c))
            W, bb = fold.fold_linear_output(fp[f"{self.v}.weight"].T, fp.get(f"{self.v}.bias"), inv, compute=c)
            Wt[self.v] = (W.T, bb)
            W, bb = fold.fold_linear_input(fp[f"{self.o}.weight"].T, fp.get(f"{self.o}.bias"),
                                           fold.block_diag_heads(heads, self.repeat), compute=c)
            Wt[self.o] = (W.T, bb)
        for name, lin in self.linears.items():
            W, bb = Wt.get(name, (fp[f"{name}.weight"], fp.get(f"{name}.bias")))
            gs = cfg.group_size or lin.in_features
            out[f"{name}.weight"] = lwc_fake_quant(W, self.up[name], self.low[name], cfg.bits, gs) if quantize else W
            if bb is not None:
                out[f"{name}.bias"] = bb
        return out, hooks


def _with_norm_hooks(layer, hooks):
    handles = []
    for norm, P in hooks:
        handles.append(get_module(layer, norm).register_forward_hook(
            lambda mod, args, y, P=P: layer_output(y) @ P))
    return handles


def _forward(layer, params, hooks, x, args, kwargs):
    handles = _with_norm_hooks(layer, hooks)
    try:
        return layer_output(functional_call(layer, params, (x, *args), kwargs, strict=False))
    finally:
        for h in handles:
            h.remove()


def _watch_stats(layer, family: Family, stats: dict) -> list:
    """Hooks recording, over the forwards that follow, the per-channel max |x| (and the reference's EMA of
    (max+min)/2, for shifts) of the inputs of the transformed linears. Returns the handles."""
    linears = layer_linears(layer, family)
    handles = []

    def watch(key):
        def hook(mod, inputs):
            t = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            amax = t.abs().amax(0)
            stats[f"{key}.absmax"] = torch.maximum(stats.get(f"{key}.absmax", amax), amax)
            mid = (t.amax(0) + t.amin(0)) / 2
            n = stats.get(f"{key}.n", 0)
            stats[f"{key}.mid"] = mid if n == 0 else 0.99 * stats[f"{key}.mid"] + 0.01 * mid  # the reference's EMA
            stats[f"{key}.n"] = n + 1

        return hook

    for norm, names in family.norm_linears:
        handles.append(linears[names[0]].register_forward_pre_hook(watch(norm)))
    pair = head_pair(family)
    if pair is not None:
        handles.append(linears[pair[1]].register_forward_pre_hook(watch("o")))
    return handles


def _kept_numel(layers, family: Family) -> int:
    """Elements of what `AffineQuant.quantize` keeps per decoder layer for the export: every parameter before the
    merge (`fp_state`) and every linear's transformed weight (`expected`)."""
    total = 0
    for _, layer in layers:
        total += store_numel(layer.parameters())
        total += store_numel(lin.weight for lin in layer_linears(layer, family).values())
    return total


@register_method("affinequant")
class AffineQuant(Method):
    """AffineQuant: learned affine transforms + learnable weight clipping, trained block by block."""

    Config = AffineQuantConfig
    needs_calibration = True
    learns_transforms = True
    device_solvers = False  # the training loop runs on the CPU (qcompiler/quantize/device.py)
    # Its full-precision copies, the copy exported with transforms, the per-block training state (fold passes spill
    # the weights they rewrite to a file): SmolLM2-135M 3.10 GB (1 epoch, 8 × 256), the 0.98 GB synthetic LLaMA
    # 4.72 GB (0 epochs) → at most 4.6× + base; 6× keeps a margin.
    memory_param_factor = 6.0
    # --offload-weights: the full-precision copies are file pages too (spill stores): measured anonymous peaks 0.99 GB
    # on SmolLM2-135M (1 epoch, 8 × 256 calibration) and 1.11 GB on the 0.98 GB synthetic LLaMA (0 epochs) → ≤ 0.7× +
    # base.
    memory_offload_param_factor = 1.0
    # layer inputs and outputs plus the full-precision targets (and the aug_loss targets)
    memory_activation_copies = 5
    presets = {
        "w4a16g128": {"bits": 4, "group_size": 128, "epochs": 20},
        "w3a16g128": {"bits": 3, "group_size": 128, "epochs": 20},
        "w4a16g64": {"bits": 4, "group_size": 64, "epochs": 20},
        "w3a16g64": {"bits": 3, "group_size": 64, "epochs": 20},
        "w2a16g64": {"bits": 2, "group_size": 64, "epochs": 40, "aug_loss": True},
        # learned clipping alone (the reference's --lwc without --let), one window per step: on SmolLM2-135M w3g64
        # 45.3 ppl vs 64.6 with the transforms learned and GPTQ's 63.5 (bench/results/quality-affinequant-lwc.md)
        "w3a16g64-lwc": {"bits": 3, "group_size": 64, "epochs": 20, "batch_size": 1, "aug_loss": True, "let": False},
        # the same at 2 bits: 270 ppl vs 7340 with the transforms learned and GPTQ's 15700
        # (bench/results/quality-affinequant-w2-lwc.md)
        "w2a16g64-lwc": {"bits": 2, "group_size": 64, "epochs": 20, "batch_size": 1, "aug_loss": True, "let": False},
        # the reference's llama w4a4 script: per-channel weights, aug_loss, sf 0.1 (its q/k matrix is not used here)
        "w4a4": {"bits": 4, "group_size": 0, "abits": 4, "epochs": 20, "aug_loss": True, "sf": 0.1},
    }

    def quantize(self, model, family, *, calibration=None, progress=True, device=None) -> QuantizationResult:
        from tqdm.auto import tqdm

        cfg: AffineQuantConfig = self.config
        self.check_device(device)
        if not calibration:
            raise QCompilerError("affinequant needs calibration windows")
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        plan = TransformPlan()
        layers_out, report = {}, {}
        desc = f"affinequant w{cfg.bits}g{cfg.group_size or 'row'}"
        with calibration_mode(model):
            with torch.no_grad():
                inputs = capture_layer_inputs(model, family, calibration)
            quant_x = inputs.hidden
            fp_x = quant_x.clone()
            n = quant_x.shape[0]
            layers = list(iter_layers(model, family))
            # the model-sized copies kept for the export (full-precision parameters, transformed weights): file
            # pages when the model is offloaded (--offload-weights), else memory
            spill = offload.spill_store(model, _kept_numel(layers, family))
            outer = tqdm(layers, desc=desc, disable=not progress, unit="layer")
            for index, (path, layer) in enumerate(outer):
                tick = time.perf_counter()
                check_finite(quant_x, f"the input of {path}")
                call = lambda a: inputs.calls[inputs.call_of[a]]  # noqa: E731
                for p in layer.parameters():
                    p.requires_grad_(False)
                # full-precision targets (the fp chain) and activation statistics
                stats: dict = {}
                aug = torch.empty_like(fp_x) if cfg.aug_loss else None
                with torch.no_grad():
                    for a in range(n):
                        args, kwargs = call(a)
                        watch = _watch_stats(layer, family, stats)
                        try:
                            fp_x[a:a + 1] = layer_output(layer(fp_x[a:a + 1], *args, **kwargs))
                        finally:
                            for h in watch:
                                h.remove()
                        if aug is not None:
                            aug[a:a + 1] = layer_output(layer(quant_x[a:a + 1], *args, **kwargs))
                state = _LayerState(layer, path, family, cfg, stats, (kv, heads // kv, head_dim))
                for name, p in layer.named_parameters():
                    plan.fp_state[f"{path}.{name}"] = keep(spill, p)
                for name, lin in state.linears.items():
                    if lin.bias is None:
                        plan.fp_state[f"{path}.{name}.bias"] = None
                groups = state.params()
                loss_value = float("nan")
                act_hooks = (install_act_quant(state.linears.values(), cfg.abits, ste=True) if cfg.abits < 16
                             else [])
                if cfg.epochs > 0 and groups:
                    opt = torch.optim.AdamW(groups, weight_decay=cfg.wd)
                    steps = math.ceil(n / cfg.batch_size)
                    for epoch in range(cfg.epochs):
                        state.set_epoch(epoch)
                        total = 0.0
                        for k in range(steps):
                            a, b = k * cfg.batch_size, min(n, (k + 1) * cfg.batch_size)
                            args, kwargs = call(a)
                            params, hooks = state.weights()
                            out = _forward(layer, params, hooks, quant_x[a:b], args, kwargs)
                            loss = torch.nn.functional.mse_loss(out, fp_x[a:b])
                            if aug is not None:
                                loss = loss + torch.nn.functional.mse_loss(out, aug[a:b])
                            if not torch.isfinite(loss):
                                raise QCompilerError(f"affinequant: non-finite loss at {path}, epoch {epoch}; "
                                                     "lower --let-lr / --lwc-lr")
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            state.enforce()
                            total += loss.item()
                        loss_value = total / steps
                        outer.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_value:.3g}")
                else:
                    state.set_epoch(max(cfg.epochs - 1, 0))
                for h in act_hooks:
                    h.remove()
                # merge: transformed fp weights (qcompiler.graph.fold, as the passes), quantized with the learned clipping
                layer_t = state.transforms()
                with torch.no_grad():
                    merged = layer_t.merged_weights(model)
                    for name, lin in state.linears.items():
                        full = f"{path}.{name}"
                        W, b = merged.get(full, (lin.weight.detach().float(), None if lin.bias is None
                                                 else lin.bias.detach().float()))
                        gs = cfg.group_size or lin.in_features
                        scale, zero = lwc_params(W, state.up[name].detach(), state.low[name].detach(), cfg.bits, gs)
                        scale = to_fp16_grid(scale)
                        gi = torch.arange(W.shape[1]) // gs
                        codes = quantize_codes(W, scale[:, gi], zero[:, gi], bits=cfg.bits)
                        evaluated = dequantize_groups(codes, scale, zero, gs)
                        packed = to_spqr_weight(codes, scale, zero, bits=cfg.bits, group_size=gs, bias=b)
                        layers_out[full] = keep_arrays(model, packed)
                        report[full] = layer_report(W, evaluated, packed)
                        plan.expected[full] = keep(spill, W).numpy()  # what the graph holds once the passes folded
                        if b is not None:
                            plan.expected_bias[full] = b.numpy().copy()
                        lin.weight.copy_(evaluated)
                        if b is not None:
                            if lin.bias is None:
                                lin.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
                            else:
                                lin.bias.copy_(b)
                    layer_t.merge_norms(model)
                    if cfg.abits < 16:  # the merged model quantizes activations as the graph will
                        install_act_quant(state.linears.values(), cfg.abits)
                    plan.norms += layer_t.norms
                    plan.heads += layer_t.heads
                    if index + 1 < len(layers):
                        for a in range(n):
                            args, kwargs = call(a)
                            quant_x[a:a + 1] = layer_output(layer(quant_x[a:a + 1], *args, **kwargs))
                del state
                offload.release_free_memory()
                log.info("%s: %s: loss %.4g, %.1fs", desc, path, loss_value, time.perf_counter() - tick)
        config = {"method": "affinequant", **dataclasses.asdict(cfg)}
        return QuantizationResult(layers=layers_out, config=config, report=report, activation_bits=cfg.abits,
                                  transforms=plan)
