"""The export driver: load → quantize (PyTorch) → export (ONNX) → passes → emit → validate, in the order data flows.

Each stage lives in its own package (docs/architecture.md): `models/` loads, `quantize/` quantizes, `graph/` exports,
`passes/` rewrite (the list is declared in `plan.py`), `emit.py` writes the folder and `validate.py` checks it in
ONNX Runtime before it is published. This file only calls them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from qcompiler import QCompilerError, emit
from qcompiler import validate as validation
from qcompiler.folder import check_output
from qcompiler.plan import GraphOptions, pass_list
from qcompiler.progress import StageClock


@dataclasses.dataclass
class ExportReport:
    """What `export` did.

    Attributes:
        output: the written folder.
        avg_bits: average stored bits per quantized parameter (over all quantized layers).
        n_quantized: number of linears replaced by SpQRMatMul.
        max_abs_logit_diff: ORT (with the op library) vs PyTorch fake-quant logits on a validation input, or None.
        seconds: wall time per stage.
        peak_rss_gb: the process's peak resident memory (GB, high-water mark) at the end of each stage: where it
            grows is the stage that set it.
        peak_anon_gb: with `offload_weights`, the highest resident anonymous memory sampled during the export (the
            weights' file pages, which the kernel can drop, are not in it).
    """

    output: Path
    avg_bits: float
    n_quantized: int
    max_abs_logit_diff: Optional[float]
    seconds: dict[str, float]
    peak_rss_gb: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_anon_gb: Optional[float] = None


def export(source: str, *, output: str, method: str, method_options: dict[str, Any], force: bool = False,
           calibration: Optional[str] = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
           device: Optional[str] = "auto", verify_each: bool = False, dump_dir: Optional[str] = None,
           validate: bool = True, atol: Optional[float] = None, rtol: Optional[float] = None, dtype: str = "fp32",
           accuracy_level: Optional[int] = None,
           memory_check: bool = True, offload_weights: bool = False, fallback: bool = True, contrib_ops: bool = True,
           lm_head: Optional[Any] = None, quiet: bool = False) -> ExportReport:
    """Quantize `source` with `method` and write an ONNX folder to `output`. See `qcompiler export --help`.
    `lm_head`: a `qcompiler.quantize.lm_head.LMHeadConfig` to quantize the output projection too (None: kept; method
    "auto": the method's measured default, `LMHeadConfig.resolve_auto`).
    `device`: where calibration and the solvers run (`qcompiler.quantize.device.resolve_device`; "auto" picks the CPU
    for methods whose solvers run there only).
    `accuracy_level`: None = the method's measured default for `method_options` (`Method.default_accuracy_level`)."""
    from qcompiler.data import calibration_windows, resolve_calibration
    from qcompiler.models.families import family_for, quantizable_linears
    from qcompiler.models.loading import load_config
    from qcompiler.models.preflight import check_linear_sizes, check_memory, estimate_memory
    from qcompiler.passes import PassContext, PassManager
    from qcompiler.quantize.device import resolve_device
    from qcompiler.quantize.methods import get_method

    # fail fast on everything that can be checked before loading a model
    check_output(output, force=force)
    method_cls = get_method(method)
    config = method_cls.Config(**method_options)
    compute = resolve_device("cpu" if device in (None, "auto") and not method_cls.device_solvers else device)
    method_cls.check_device(compute)
    head_by_default = lm_head is not None and lm_head.method == "auto"
    if lm_head is not None:
        lm_head = lm_head.resolve_auto(method_cls, config, dtype=dtype)
    if accuracy_level is None:
        accuracy_level = method_cls.default_accuracy_level(config, lm_head=lm_head is not None)
    tolerance = validation.Tolerance.for_export(dtype, atol=atol, rtol=rtol, transforms=method_cls.learns_transforms)
    if lm_head is not None and method_cls.learns_transforms:
        raise QCompilerError("--lm-head is not supported with transform methods (affinequant): the export rebuilds "
                             "their full-precision model around the transforms")
    if method_cls.learns_transforms and dtype != "fp32":
        raise QCompilerError("--dtype fp16 is not supported with transform methods (affinequant): the fold passes "
                             "are exact in fp32 only")
    head_calibrated = lm_head is not None and lm_head.needs_calibration
    calibration = resolve_calibration(method if method_cls.needs_calibration else f"--lm-head {lm_head.method}",
                                      calibration) if method_cls.needs_calibration or head_calibrated else None
    hf_config = load_config(source)
    family = family_for(hf_config)
    memory = estimate_memory(hf_config, method_cls, calibrated=method_cls.needs_calibration, nsamples=nsamples,
                             seqlen=seqlen, offload=offload_weights)
    if memory_check:
        check_memory(memory)
    clock = StageClock(quiet=quiet, anon_peak=_anon_peak() if offload_weights else None)

    with clock("load", f"loading {source} (estimated peak memory {memory.describe()})"):
        model, tokenizer = _load(source, offload=offload_weights, quiet=quiet)
    check_linear_sizes({path: (lin.in_features, lin.out_features)
                        for path, lin in quantizable_linears(model, family).items()},
                       outliers=math.isfinite(getattr(config, "outlier_threshold", math.inf)))
    calib = calibration_windows(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed) \
        if calibration else None

    on = "" if compute.type == "cpu" else f" on {compute}"
    with clock("quantize", f"quantizing with {method} ({config}){on}"):
        result = method_cls(config).quantize(model, family, calibration=calib if method_cls.needs_calibration
                                             else None, progress=not quiet, device=compute)
    if not result.layers and method_cls.quantizes:
        raise QCompilerError("no linear layer was quantized (nothing to export)")
    if isinstance(result.config.get("allocation"), dict):  # --target-bits: what each setting got
        from qcompiler.quantize.allocation import describe as describe_allocation

        clock.say(describe_allocation(result.config["allocation"]) or "")
    head = None
    if lm_head is not None:
        from qcompiler.quantize.lm_head import describe, quantize_lm_head

        with clock("lm_head", "quantizing the lm_head"):
            head = quantize_lm_head(model, family, lm_head, calibration=calib, hessian=result.head_hessian,
                                    hessian_windows=result.head_windows, progress=not quiet)
        clock.say(describe(head) + ("; the default of this method (--lm-head keep: the table at the export dtype)"
                                    if head_by_default else ""))

    with clock("export", "exporting to ONNX"):
        if offload_weights and result.transforms is None and dtype == "fp32":
            from qcompiler.models.offload import export_layout

            export_layout(model)  # the per-layer export then refers to the store's bytes instead of copying them
        # the weights stay in the exporter's file until emit copies them (no second copy of the model in memory);
        # --verify-each runs the proto in ONNX Runtime from memory, so it needs them inline
        exported = _export_graph(model, result, dtype=dtype, borrow_weights=not verify_each,
                                 fused_attention=contrib_ops)

    with clock("passes"):
        feeds = validation.random_feeds(model, exported.manifest["kv"], dtype=exported.manifest["dtype"]) \
            if verify_each else None
        passes = pass_list(GraphOptions(fallback=fallback, contrib_ops=contrib_ops, accuracy_level=accuracy_level),
                           result=result, manifest=exported.manifest,
                           extra_layers={head.path: head.weight} if head is not None else None,
                           tied_head=(head.path, head.weight) if head is not None and head.tied else None,
                           max_positions=getattr(model.config, "max_position_embeddings", None))
        run = PassManager(passes, context=PassContext(verify_each=verify_each, dump_dir=dump_dir,
                                                      verify_feeds=feeds)).run(exported.model)
    clock.say(run.summary())

    with clock("emit"):
        record = emit.export_record(
            source=source, family=family, method=method, config=config, method_options=method_options,
            result=result, model=model, manifest=exported.manifest, memory=memory, proto=run.model, lm_head=head,
            device=str(compute),
            calibration={"path": str(calibration), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
            if calib is not None else None)
        checked = emit.write_folder(output, force=force, proto=run.model, tokenizer=tokenizer,
                                    manifest=exported.manifest, record=record, model=model, hf_config=hf_config,
                                    family=family, with_library=bool(result.layers) or head is not None,
                                    tolerance=tolerance if validate else None, accuracy_level=accuracy_level)

    diff = checked["max_abs_logit_diff"] if checked else None
    bits = record["bits_per_param"]
    activations = ("int8 activations on CPU (accuracy level 4; --accuracy-level 0 for fp32)" if accuracy_level
                   else "fp32 activations")
    clock.say(f"wrote {Path(output)}: {len(result.layers) + (head is not None)} SpQRMatMul layers, {record['avg_bits']:.3f} bits/param "
              f"(decoder linears; {bits['all']:.3f} over all {bits['params_all'] / 1e6:.1f}M parameters), {activations}"
              + (f", ORT vs PyTorch max |Δlogit| = {diff:.2e}" if diff is not None else ""))
    peak_anon = clock.stop()
    return ExportReport(output=Path(output), avg_bits=record["avg_bits"], n_quantized=len(result.layers) + (head is not None),
                        max_abs_logit_diff=diff, seconds=clock.seconds, peak_rss_gb=clock.peak_rss_gb,
                        peak_anon_gb=peak_anon)


def _anon_peak():
    from qcompiler.models.offload import AnonPeak

    return AnonPeak()


def _load(source: str, *, offload: bool, quiet: bool):
    """The model and its tokenizer, in memory or (`offload`) with its weights as file pages."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if offload:
        from qcompiler.models.offload import load_offloaded

        return load_offloaded(source, store_dir=os.environ.get("QCOMPILER_OFFLOAD_DIR"), progress=not quiet)
    from qcompiler.models.loading import load_model

    return load_model(source, progress=not quiet)


def _export_graph(model: torch.nn.Module, result, *, dtype: str, borrow_weights: bool, fused_attention: bool):
    """The ONNX export of the quantized model: with learned transforms, of the full-precision model with the
    transforms as explicit nodes (the fold passes fold them); fp16, of a half copy (`model` stays the fp32
    validation reference; torch's Module.half: transformers refuses `.half()` on GGUF-loaded models)."""
    from qcompiler.graph.export import export_model

    if result.transforms is not None:
        with result.transforms.export_copy(model) as fp_model:
            return export_model(fp_model, transforms=result.transforms.manifest(), borrow_weights=borrow_weights,
                                fused_attention=fused_attention)
    return export_model(torch.nn.Module.half(copy.deepcopy(model)) if dtype == "fp16" else model,
                        borrow_weights=borrow_weights, fused_attention=fused_attention)
