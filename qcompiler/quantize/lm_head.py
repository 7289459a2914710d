"""The output projection (lm_head) quantized into a `SpQRMatMul` like the decoder's linears (`--lm-head`).

The lm_head is the largest single matrix of a small model's decode step (SmolLM2-135M: 49152 × 576, ~2/3 of the bytes
a step reads in fp32). It is quantized after the method has quantized the decoder, with its own settings:

- `rtn`: min-max round-to-nearest per group of `group_size` input features (the RTN method's arithmetic), fp16
  scale and zero per group (4 bits, group 32: 5 bits per parameter).
- `gptq`: GPTQ (qcompiler/quantize/methods/gptq.py, the same grid and storage) calibrated on the lm_head's own input:
  the final norm's output over the calibration windows, as the quantized decoder computes it (the block-sequential
  engine's `QuantizationResult.head_hessian` after GPTQ / SpQR; else `qcompiler.quantize.calibration.head_hessian`,
  a forward of the model). Columns in their own order by default (`act_order=False`): a
  permuted table could not serve a tied embedding's lookup, which reads rows as stored.

A tied lm_head (the embedding table, Llama 3.2 / SmolLM2 / Gemma) stays one table, quantized: the embedding's lookup
reads the same decoded rows (as llama.cpp's tied `token_embd`). In PyTorch both modules get the decoded weight (the
export traces them as two tables); the `embed-from-lm-head` pass then serves the lookup from the lm_head's
SpQRMatMul initializers (`qcompiler::SpQRGather`), so the folder stores the table once.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from qcompiler import QCompilerError
from qcompiler.graph.format import SpQRWeight
from qcompiler.models.families import Family, get_module
from qcompiler.quantize.methods.base import (check_bits, check_group_size, dequantize_groups, layer_report,
                                             round_to_nearest, to_spqr_weight)

METHODS = ("rtn", "gptq")
AUTO = "auto"  # `--lm-head auto` (the CLI's default): the export's method decides (`Method.default_lm_head`)
# Code width where --lm-head-bits is not given, per method, chosen by measurement (SmolLM2-135M, tied table,
# WikiText-2 40 × 512). rtn: 8 bits, lossless (PyTorch, decoder fp32: 29.168 against 29.188,
# bench/results/lm-head-probe-2026-12-07.md; ONNX Runtime with the 4-bit SpQR decoder and int8 X: 31.027 against the
# fp32 table's 31.034 at 1.43× its decode speed, bench/results/peers-2026-12-07-head8.md) where 4-bit RTN costs +6.8 %.
# gptq: 4 bits, a third of RTN's 4-bit cost (+3.0 %) at half the 8-bit table's bytes.
DEFAULT_BITS = {"rtn": 8, "gptq": 4}


def default_group_size(bits: int) -> int:
    """Input features per group where --lm-head-group-size is not given: 128 for 8-bit codes (the measured lossless
    table: 8.25 stored bits a parameter), else 32 (the measured 4-bit setting)."""
    return 128 if bits == 8 else 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMHeadConfig:
    """How the lm_head is quantized (`--lm-head METHOD --lm-head-bits B --lm-head-group-size G`).

    Attributes:
        method: "rtn" or "gptq"; "auto": the export's method decides (`resolve_auto`), bits and group size resolved
            then.
        bits: code width, 2, 3, 4 or 8; None: the method's measured default (`DEFAULT_BITS`: rtn 8, gptq 4).
        group_size: input features per scale/zero group; None: `default_group_size(bits)` (128 at 8 bits, else 32).
        round_zero: integer zero points (GPTQ's quantizer); False (the default for both methods): the exact
            per-group min-max range (SmolLM2-135M, tied table, gptq 4-bit: 30.052 against 30.013 perplexity with
            integer zeros, bench/results/lm-head-probe-2026-12-07.md; at 3 bits the exact range was 2 % better in
            a throwaway run).
        act_order: gptq: columns by decreasing Hessian diagonal (stored as the op's permutation; a tied embedding
            then keeps its float table, the gather cannot serve a permuted one).
        percdamp: gptq: diagonal damping, a fraction of the mean of diag(H).
        nsamples: gptq after a method without calibration (rtn, none): windows of the model's own forward for the
            Hessian (the first ones of the export's; None: all of them; each costs a forward of the whole model,
            SmolLM2-135M: ~4-7 s per 2048-token window on 2 cores). After GPTQ / SpQR the Hessian comes with the
            decoder's calibration, over all its windows, at the cost of one layer's forward.
    """

    method: str = "rtn"
    bits: Optional[int] = None
    group_size: Optional[int] = None
    round_zero: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    nsamples: Optional[int] = 16

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, AUTO):
            raise QCompilerError(f"--lm-head must be one of {', '.join((AUTO, 'keep', *METHODS))}, got "
                                 f"{self.method!r}")
        if self.method == AUTO:
            return
        if self.bits is None:
            object.__setattr__(self, "bits", DEFAULT_BITS[self.method])
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.bits))
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.nsamples is not None and self.nsamples < 1:
            raise QCompilerError(f"--lm-head-nsamples must be at least 1 (got {self.nsamples})")
        if not 0 <= self.percdamp < 1:
            raise QCompilerError(f"lm_head percdamp must be in [0, 1) (got {self.percdamp})")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def resolve_auto(self, method_cls, method_config, *, dtype: str) -> Optional["LMHeadConfig"]:
        """The settings an `auto` config stands for in an export with `method_cls(method_config)` at `dtype`: the
        method's `default_lm_head` (fp32 graphs of methods without learned transforms; fp16 exports are for GPUs,
        where the 8-bit codes' kernel has not run yet), else None (the table kept). Other configs: themselves."""
        if self.method != AUTO:
            return self
        chosen = None if dtype != "fp32" or method_cls.learns_transforms else method_cls.default_lm_head(method_config)
        if chosen is None:
            if self.bits is not None or self.group_size is not None:
                raise QCompilerError("--lm-head-bits / --lm-head-group-size need --lm-head rtn or gptq: the default "
                                     "(auto) keeps this export's lm_head")
            return None
        return dataclasses.replace(self, method=chosen)


@dataclasses.dataclass
class LMHeadResult:
    """The quantized lm_head.

    Attributes:
        path: its module path (`Family.lm_head`).
        weight: the layer in `SpQRMatMul` form.
        report: as a `QuantizationResult.report` entry (avg_bits, rel_error, ...).
        tied: it shared its weight with the input embedding (which now holds the same decoded weight).
        config: the settings, JSON-serializable (quant_config.json's `lm_head`).
    """

    path: str
    weight: SpQRWeight
    report: dict[str, float]
    tied: bool
    config: dict


def untie(model: torch.nn.Module, linear: torch.nn.Linear) -> bool:
    """Give `linear` its own copy of a weight it shares with the input embedding; returns whether it was shared.
    (The export traces untied modules as a Gather and a MatMul on separate initializers, which replace-linear and
    embed-from-lm-head rewrite; a tied pair exports as a MatMul on a Transpose of the Gather's table.)"""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or linear.weight is not embedding.weight:
        return False
    linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # nothing may tie them again (the export copy, save_pretrained)
    return True


def quantize_lm_head(model: torch.nn.Module, family: Family, config: LMHeadConfig, *,
                     calibration: Optional[Sequence[torch.Tensor]] = None, hessian: Optional[torch.Tensor] = None,
                     hessian_windows: int = 0, progress: bool = True) -> LMHeadResult:
    """Quantize `model`'s lm_head in place (its weight becomes the evaluated one) and return it as a layer.

    gptq: `hessian` (`QuantizationResult.head_hessian`, over `hessian_windows` windows) where the decoder's method
    computed it, else the forward of `qcompiler.quantize.calibration.head_hessian` over the first `config.nsamples`
    of `calibration` (token windows `LongTensor [1, seqlen]`)."""
    linear = get_module(model, family.lm_head)
    if not isinstance(linear, torch.nn.Linear):
        raise QCompilerError(f"--lm-head: {family.lm_head} is not a linear layer ({type(linear).__name__})")
    if config.needs_calibration and not calibration and hessian is None:
        raise QCompilerError(f"--lm-head {config.method} needs calibration windows")
    tied = untie(model, linear)
    w = linear.weight.detach()
    if config.method == "gptq":
        from qcompiler.quantize.calibration import head_hessian
        from qcompiler.quantize.methods.gptq import gptq_quantize_layer

        from_decoder = hessian is not None
        if not from_decoder:
            windows = list(calibration)[: config.nsamples] if config.nsamples is not None else list(calibration)
            hessian, hessian_windows = head_hessian(model, family, windows, progress=progress), len(windows)
        solved = gptq_quantize_layer(w, hessian, bits=config.bits, group_size=config.group_size,
                                     act_order=config.act_order, percdamp=config.percdamp,
                                     round_zero=config.round_zero, bias=linear.bias)
        evaluated, packed, report = solved.evaluated, solved.packed, solved.report
        report["hessian_windows"] = hessian_windows
        report["hessian_from"] = "the decoder's calibration" if from_decoder else "a forward of the model"
    else:
        codes, scale, zero = round_to_nearest(w, bits=config.bits, group_size=config.group_size,
                                              round_zero=config.round_zero)
        evaluated = dequantize_groups(codes, scale, zero, config.group_size)
        packed = to_spqr_weight(codes, scale, zero, bits=config.bits, group_size=config.group_size, bias=linear.bias)
        report = layer_report(w, evaluated, packed)
    with torch.no_grad():
        linear.weight.copy_(evaluated.to(linear.weight.dtype))
        if tied:  # one table: the lookup reads the quantized rows too
            model.get_input_embeddings().weight.copy_(evaluated.to(linear.weight.dtype))
    return LMHeadResult(path=family.lm_head, weight=packed, report=report, tied=tied,
                        config=dataclasses.asdict(config))


def describe(result: Optional[LMHeadResult]) -> str:
    if result is None:
        return "lm_head kept at the export dtype"
    c = result.config
    return (f"lm_head {c['method']} {c['bits']}-bit g{c['group_size']}: {result.report['avg_bits']:.2f} bits/param, "
            f"relative error {result.report['rel_error']:.4f}"
            + (" (tied: the embedding's lookup reads the same quantized table)" if result.tied else ""))
