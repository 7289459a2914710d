"""The export driver: load → quantize (PyTorch) → export (ONNX) → passes → emit → validate in ONNX Runtime.

Each stage lives in its own module; this file only wires them together in the order data flows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch

from . import QCompilerError, __version__
from .emit import (CONFIG_FILE, LIBRARY_FILE, MANIFEST_FILE, MODEL_FILE, atomic_output, check_output, set_aside,
                   write_json)
from .format import OP_TYPE
from .offload import release_free_memory

log = logging.getLogger("qcompiler")

DTYPES = ("fp32", "fp16")
# Validation tolerance (atol, rtol) of ORT logits against the PyTorch fp32 fake-quant model: fp32 graphs differ by
# summation order only; fp16 graphs also round activations and unquantized weights to fp16.
DEFAULT_TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (5e-2, 1e-2)}
# Learned transforms folded into norms and weights (AffineQuant) spread the norm scales over orders of magnitude,
# which amplifies fp32 summation-order differences: SmolLM2-135M, 20 epochs, showed 5.8e-3 at max |logit| 30.7
# (1.9e-4 relative), above the default 4.1e-3. A decoding bug moves logits by O(1).
TRANSFORM_RTOL = 1e-3


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


def _echo(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def export(
    source: str,
    *,
    output: str,
    method: str,
    method_options: dict[str, Any],
    force: bool = False,
    calibration: Optional[str] = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    verify_each: bool = False,
    dump_dir: Optional[str] = None,
    validate: bool = True,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    dtype: str = "fp32",
    accuracy_level: int = 0,
    memory_check: bool = True,
    offload_weights: bool = False,
    fallback: bool = True,
    contrib_ops: bool = True,
    quiet: bool = False,
) -> ExportReport:
    """Quantize `source` with `method` and write an ONNX folder to `output`. See `qcompiler export --help`."""
    from .families import family_for, quantizable_linears
    from .preflight import check_linear_sizes, check_memory, estimate_memory, peak_rss_gb
    from .loading import load_config, load_model
    from .methods import get_method
    from .passes import (AddFallback, Cleanup, FoldAffineIntoLinear, FoldAffineIntoNorm, FuseRotary, PassContext,
                         PassManager, QuantizeActivations, ReplaceLinear, RsqrtAsDiv, SetAccuracyLevel)
    from .passes.base import save_model

    # Fail fast on everything that can be checked before loading a model.
    check_output(output, force=force)
    if dtype not in DTYPES:
        raise QCompilerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    rtol_given = rtol is not None
    atol = DEFAULT_TOLERANCE[dtype][0] if atol is None else atol
    rtol = DEFAULT_TOLERANCE[dtype][1] if rtol is None else rtol
    method_cls = get_method(method)
    config = method_cls.Config(**method_options)
    needs_calibration = getattr(method_cls, "needs_calibration", False)
    if needs_calibration and calibration is None:  # the default text, or an error naming where it was looked for
        from .data import CALIBRATION_FILE, require_data_file

        calibration = str(require_data_file(
            CALIBRATION_FILE, f"method '{method}' needs calibration text: pass --calibration PATH"))
    hf_config = load_config(source)
    family = family_for(hf_config)
    memory = estimate_memory(hf_config, method, calibrated=needs_calibration, nsamples=nsamples, seqlen=seqlen,
                             offload=offload_weights)
    if memory_check:
        check_memory(memory)
    secs: dict[str, float] = {}
    peaks: dict[str, float] = {}

    anon = None
    anon_peaks: dict[str, float] = {}

    def stage_done(stage: str, started: float) -> None:
        release_free_memory()
        secs[stage] = time.perf_counter() - started
        peaks[stage] = peak_rss_gb()
        if anon is not None:
            anon_peaks[stage] = anon.peak

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t = time.perf_counter()
    _echo(f"loading {source} (estimated peak memory {memory.describe()})", quiet)
    if offload_weights:
        from .offload import AnonPeak, load_offloaded

        anon = AnonPeak()
        model, tokenizer = load_offloaded(source, store_dir=os.environ.get("QCOMPILER_OFFLOAD_DIR"),
                                          progress=not quiet)
    else:
        model, tokenizer = load_model(source, progress=not quiet)
    stage_done("load", t)
    check_linear_sizes({path: (lin.in_features, lin.out_features)
                        for path, lin in quantizable_linears(model, family).items()},
                       outliers=math.isfinite(getattr(config, "outlier_threshold", math.inf)))

    calib = None
    if needs_calibration:
        from .data import calibration_windows

        calib = calibration_windows(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)

    t = time.perf_counter()
    _echo(f"quantizing with {method} ({config})", quiet)
    quantizer = method_cls(config) if _takes_config(method_cls) else method_cls()
    result = quantizer.quantize(model, family, calibration=calib, progress=not quiet)
    stage_done("quantize", t)
    if not result.layers and getattr(method_cls, "quantizes", True):
        raise QCompilerError("no linear layer was quantized (nothing to export)")

    t = time.perf_counter()
    _echo("exporting to ONNX", quiet)
    from .export import export_model

    if result.transforms and dtype != "fp32":
        raise QCompilerError("--dtype fp16 is not supported with transform methods (affinequant): the fold passes "
                             "are exact in fp32 only")
    # the weights stay in the exporter's file until emit copies them (no second copy of the model in memory);
    # --verify-each runs the proto in ONNX Runtime from memory, so it needs them inline
    borrow = not verify_each
    if result.transforms and not rtol_given:
        rtol = max(rtol, TRANSFORM_RTOL)
    if result.transforms:
        # the full-precision model with the transforms as explicit nodes; the fold passes fold them
        fp_model = full_precision_copy(model, result)
        handles = result.transforms.install(fp_model)
        exported = export_model(fp_model, transforms=result.transforms.manifest(), borrow_weights=borrow)
        for h in handles:
            h.remove()
        del fp_model
        passes = [FoldAffineIntoNorm(exported.manifest), FoldAffineIntoLinear(exported.manifest),
                  ReplaceLinear(result.layers, exported.manifest, expected=result.expected,
                                expected_bias=result.expected_bias)]
    else:
        # fp16: the graph is exported from a half copy; `model` stays fp32 as the validation reference
        # (torch's Module.half: transformers refuses `.half()` on GGUF-loaded models, which it flags as quantized)
        exported = export_model(torch.nn.Module.half(copy.deepcopy(model)) if dtype == "fp16" else model,
                                borrow_weights=borrow)
        passes = [ReplaceLinear(result.layers, exported.manifest)]
    stage_done("export", t)

    t = time.perf_counter()
    ctx = PassContext(verify_each=verify_each, dump_dir=dump_dir,
                      verify_feeds=random_feeds(model, exported.manifest["kv"], dtype=exported.manifest["dtype"])
                      if verify_each else None)
    abits = result.config.get("abits", 16) if isinstance(result.config, dict) else 16
    if abits < 16:
        passes.append(QuantizeActivations(result.layers, abits))
    # graph forms ONNX Runtime runs as fewer kernels: RMSNorm as its fusable Div form (standard ops); with contrib ops
    # (the default) each rotary embedding as one com.microsoft::RotaryEmbedding
    passes.append(RsqrtAsDiv())
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if contrib_ops and max_positions:
        passes.append(FuseRotary(int(max_positions)))
    pipeline = PassManager([*passes, Cleanup(), *([AddFallback()] if fallback else [])], context=ctx)
    run = pipeline.run(exported.model)
    proto = run.model
    stage_done("passes", t)
    if not quiet:
        print(run.summary())

    total_bits = sum(sum(w.stored_bits().values()) for w in result.layers.values())
    total_params = sum(w.N * w.K for w in result.layers.values())
    avg_bits = total_bits / total_params if total_params else float(torch.finfo(next(model.parameters()).dtype).bits)
    quant_config = {
        "qcompiler_version": __version__,
        "source": str(Path(source).resolve()) if Path(source).exists() else source,
        "family": family.name,
        "method": method,
        "config": _jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else dict(method_options),
        "avg_bits": avg_bits,
        "quantized_params": total_params,
        "n_quantized_layers": len(result.layers),
        "kv": exported.manifest["kv"],
        "dtype": exported.manifest["dtype"],
        "memory_estimate_gib": round(memory.total / 2**30, 2),
        "fallback_functions": [f.overload for f in proto.functions if f.name == OP_TYPE],
        "contrib_ops": sorted({n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}),
        "layers": _jsonable(result.report) if getattr(result, "report", None) else {},
    }
    if result.transforms:
        kept = [t for t in proto.graph.initializer if t.name.endswith((".affine_matrix", ".affine_shift"))]
        quant_config["affine"] = {
            "norm_transforms": len(result.transforms.norms),
            "head_transforms": len(result.transforms.heads),
            "matrices": any(t.matrix for t in result.transforms.norms),
            # what stays in the graph after folding (--ln-matrix): fp32 MatMul weights next to the norms
            "kept_tensors": len(kept),
            "kept_bytes": sum(int(np.prod(t.dims)) * 4 for t in kept),
        }
    if calib is not None:
        quant_config["calibration"] = {"path": str(calibration), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    _set_metadata(proto, {"qcompiler.method": method, "qcompiler.version": __version__,
                          "qcompiler.config": json.dumps(quant_config["config"]),
                          "qcompiler.avg_bits": f"{avg_bits:.4f}"})

    t = time.perf_counter()
    with atomic_output(output, force=force) as tmp:
        # the weights leave memory as they are written (the proto keeps references to model.onnx.data)
        save_model(proto, str(tmp / MODEL_FILE), consume=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MANIFEST_FILE, exported.manifest)
        if result.layers:  # the op library travels with the model (examples/deploy_python.py loads it from OUT)
            from .ops import library_path

            shutil.copy2(library_path(), tmp / LIBRARY_FILE)
            quant_config["op_library"] = LIBRARY_FILE
        from .genai import GENAI_CONFIG_FILE, genai_config

        genai = genai_config(hf_config, family, exported.manifest["kv"],
                             generation_config=getattr(model, "generation_config", None),
                             library=LIBRARY_FILE if result.layers else None)
        if genai is not None:
            write_json(tmp / GENAI_CONFIG_FILE, genai)
        diff = None
        if validate:
            diff, scale = validate_logits(tmp, model, exported.manifest["kv"])
            limit = atol + rtol * scale
            quant_config["validation"] = {"max_abs_logit_diff": diff, "max_abs_logit": scale, "atol": atol,
                                          "rtol": rtol, "limit": limit}
            if diff > limit:
                # keep the (complete) export for inspection instead of discarding hours of calibration
                quant_config["validation"]["passed"] = False
                write_json(tmp / CONFIG_FILE, quant_config)
                rejected = set_aside(tmp, output)
                raise QCompilerError(
                    f"validation failed: ONNX Runtime logits differ from PyTorch by {diff:.3g} (> --atol {atol:g} "
                    f"+ --rtol {rtol:g} × max |logit| {scale:.3g} = {limit:.3g}); the export was kept in "
                    f"{rejected} for inspection (`qcompiler eval` runs on it)"
                )
            quant_config["validation"]["passed"] = True
        if accuracy_level:
            # validated above at level 0 (exact fp32 semantics); the level only changes how the kernel computes
            # an attribute change: the graph file is rewritten, its tensors stay in model.onnx.data as they are
            graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
            graph = PassManager([SetAccuracyLevel(accuracy_level)], context=PassContext()).run(graph).model
            onnx.save(graph, str(tmp / MODEL_FILE))
            quant_config["accuracy_level"] = accuracy_level
            if validate:
                int8_diff, _ = validate_logits(tmp, model, exported.manifest["kv"])
                quant_config["validation"]["accuracy_level_max_abs_logit_diff"] = int8_diff
        write_json(tmp / CONFIG_FILE, quant_config)
    stage_done("emit", t)
    out = Path(output)
    _echo(
        f"wrote {out}: {len(result.layers)} SpQRMatMul layers, {avg_bits:.3f} bits/param"
        + (f", ORT vs PyTorch max |Δlogit| = {diff:.2e}" if diff is not None else ""),
        quiet,
    )
    _echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()), quiet)
    _echo("peak memory (process high-water mark after each stage): "
          + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items()), quiet)
    peak_anon = anon.stop() if anon is not None else None
    if peak_anon is not None:
        _echo("peak anonymous memory (the weights are file pages: --offload-weights): "
              + ", ".join(f"{k} {v:.2f} GB" for k, v in anon_peaks.items()), quiet)
    return ExportReport(output=out, avg_bits=avg_bits, n_quantized=len(result.layers), max_abs_logit_diff=diff,
                        seconds=secs, peak_rss_gb=peaks, peak_anon_gb=peak_anon)


def full_precision_copy(model: torch.nn.Module, result) -> torch.nn.Module:
    """A copy of a merged (AffineQuant) model with its full-precision parameters back and the merge's hooks and
    buffers removed: the model the transforms are installed on for export."""
    from .offload import copy_model
    from .transforms import NORM_MATRIX, NORM_SHIFT

    fp = copy_model(model)  # offloaded models: the copy's weights are file pages too
    modules = dict(fp.named_modules())
    with torch.no_grad():
        for name, value in result.fp_state.items():
            module_path, _, attr = name.rpartition(".")
            module = modules[module_path]
            if value is None:
                setattr(module, attr, None)
            else:
                getattr(module, attr).copy_(value)
    for path in result.layers:  # activation fake-quant hooks (w4a4): the graph gets them from a pass
        modules[path]._forward_pre_hooks.clear()
    for t in result.transforms.norms:
        norm = modules[t.norm]
        norm._forward_hooks.clear()
        for buf in (NORM_MATRIX, NORM_SHIFT):
            norm._buffers.pop(buf, None)
    return fp


def random_feeds(model: torch.nn.Module, kv: dict, *, seq: int = 8, past: int = 3, seed: int = 0,
                 dtype: str = "float32") -> dict:
    """Random graph inputs (tokens, a random KV past) for `verify_each`'s before/after runs."""
    from .export import KVLayout

    layout = KVLayout(**kv)
    rng = np.random.default_rng(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    feeds = {
        "input_ids": rng.integers(0, vocab, size=(1, seq)).astype(np.int64),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    for name in layout.input_names():
        feeds[name] = rng.standard_normal((1, layout.num_kv_heads, past, layout.head_dim)).astype(dtype)
    return feeds


def _takes_config(cls) -> bool:
    import inspect

    return len(inspect.signature(cls).parameters) > 0


def _jsonable(obj):
    """Plain JSON (RFC 8259): numpy/torch scalars to Python, non-finite floats to the strings "inf"/"-inf"/"nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def validate_logits(
    folder: Path, model: torch.nn.Module, kv: dict, *, seq: int = 16, seed: int = 0
) -> tuple[float, float]:
    """`(max |logits_ORT − logits_PyTorch|, max |logits_PyTorch|)` on a random token sequence (ORT with the op
    library, CPU EP).

    Both sides compute in fp32 with different summation orders, so their difference grows with the logits' scale
    and the depth of the model: on SmolLM2-135M GPTQ 3-bit, PyTorch fp32 itself is 1.6e-3 from a float64 run of the
    same model while ONNX Runtime is 6e-4 from it (max |logit| 34). The caller therefore accepts
    `diff ≤ atol + rtol · max |logit|`; a decoding bug moves logits by orders of magnitude more."""
    from .export import KVLayout
    from .ops import session

    layout = KVLayout(**kv)
    sess = session(str(folder / MODEL_FILE))
    vocab = sess.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else model.get_output_embeddings().weight.shape[0]
    ids = np.random.default_rng(seed).integers(0, vocab, size=(1, seq)).astype(np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None],
        **layout.empty_past(1, dtype=np.float16 if any(i.type == "tensor(float16)" for i in sess.get_inputs())
                            else np.float32),
    }
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    return float(np.max(np.abs(got.astype(np.float32) - ref))), float(np.max(np.abs(ref)))


def torch_model_from_folder(folder: str | Path, *, model_override: Optional[str] = None):
    """The PyTorch fake-quant model of an exported folder: the source model with each quantized linear's weight
    replaced by the decoded SpQRMatMul weight (read back from model.onnx). Returns (model, tokenizer)."""
    from .loading import load_config, load_model
    from .onnx_op import weight_from_node
    from .format import DOMAIN, OP_TYPE

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    source = model_override or cfg["source"]
    model, tokenizer = load_model(source)
    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    modules = dict(model.named_modules())
    n = 0
    for node in proto.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        module = node.name.rsplit("/", 1)[0]
        if module not in modules:
            raise QCompilerError(f"{folder}: node {node.name} names no module of {source}")
        w = weight_from_node(node, inits)
        lin = modules[module]
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.dequantize()))
            if w.bias is not None:  # AffineQuant folds may give a linear a bias it did not have
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(torch.from_numpy(w.bias.copy()), requires_grad=False)
                else:
                    lin.bias.copy_(torch.from_numpy(w.bias))
        n += 1
    _load_folded_norms(model, inits, modules)
    abits = (cfg.get("config") or {}).get("abits", 16)
    if abits < 16:
        from .actquant import install_act_quant

        install_act_quant([modules[n.name.rsplit("/", 1)[0]] for n in proto.graph.node
                           if n.op_type == OP_TYPE and n.domain == DOMAIN], abits)
    log.info("loaded %d quantized linears into %s", n, source)
    return model, tokenizer


def _load_folded_norms(model: torch.nn.Module, inits: dict, modules: dict) -> None:
    """Norm parameters the fold passes rewrote (initializers named `{norm}.weight` / `.bias`) and what stays after
    a norm (`{norm}.affine_matrix`, `{norm}.affine_shift`: re-attached as a hook), into the source model."""
    from onnx import numpy_helper

    from .transforms import NORM_MATRIX, NORM_SHIFT, attach_norm_residue

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name in inits and not name.endswith((".weight_t",)) and p.dim() == 1:
                p.copy_(torch.from_numpy(numpy_helper.to_array(inits[name]).copy()))
    for path, module in modules.items():
        matrix, shift = inits.get(f"{path}.{NORM_MATRIX}"), inits.get(f"{path}.{NORM_SHIFT}")
        if matrix is not None or shift is not None:
            attach_norm_residue(
                module,
                matrix=None if matrix is None else torch.from_numpy(numpy_helper.to_array(matrix).copy()),
                shift=None if shift is None else torch.from_numpy(numpy_helper.to_array(shift).copy()),
            )


def evaluate_folder(
    folder: str | Path,
    *,
    dataset: Optional[str | Path] = None,
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    backend: str = "ort",
    provider: str = "cpu",
    model_override: Optional[str] = None,
    progress: bool = True,
) -> float:
    """Perplexity of an exported folder on `dataset` (non-overlapping windows), in ONNX Runtime or PyTorch;
    `dataset` None: the WikiText-2 test rows of the data folder (`qcompiler.data.default_data_file`)."""
    from transformers import AutoTokenizer

    from .data import eval_windows, load_text_tokens
    from .evaluate import perplexity_ort, perplexity_torch

    folder = Path(folder)
    if not (folder / MODEL_FILE).exists() or not (folder / CONFIG_FILE).exists():
        raise QCompilerError(f"not an exported folder (no {MODEL_FILE} / {CONFIG_FILE}): {folder}")
    if dataset is None:
        from .data import EVAL_FILE, require_data_file

        dataset = require_data_file(EVAL_FILE, "no evaluation text: pass --dataset PATH (or the name wikitext2 to "
                                               "fetch it with `datasets`)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokens = load_text_tokens(dataset, tokenizer)
    windows = eval_windows(tokens, seqlen, max_windows)
    if backend == "torch":
        model, _ = torch_model_from_folder(folder, model_override=model_override)
        res = perplexity_torch(model, windows, progress=progress)
    else:
        from .ops import session

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else None
        sess = session(str(folder / MODEL_FILE), providers=providers)
        kv = cfg["kv"]
        res = perplexity_ort(sess, windows, num_layers=kv["num_layers"], num_kv_heads=kv["num_kv_heads"],
                             head_dim=kv["head_dim"], progress=progress)
    return float(getattr(res, "ppl", res))
