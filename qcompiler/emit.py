"""Emit: write the exported folder — model.onnx (+ model.onnx.data), tokenizer files, manifest.json, the op library,
genai_config.json, quant_config.json — atomically (`qcompiler.folder`), validated before it is published.

A folder that fails validation is complete but not published: it is set aside as `OUT.rejected` for inspection
instead of discarding hours of calibration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch

from qcompiler import QCompilerError, __version__
from qcompiler.folder import CONFIG_FILE, LIBRARY_FILE, MANIFEST_FILE, MODEL_FILE, atomic_output, set_aside, write_json
from qcompiler.graph.format import OP_TYPE
from qcompiler import validate

AFFINE_KEPT_SUFFIXES = (".affine_matrix", ".affine_shift")


def average_bits(result, model: torch.nn.Module) -> tuple[float, int]:
    """`(stored bits per quantized parameter, quantized parameters)`; the model's own width when nothing was
    quantized."""
    total_bits = sum(sum(w.stored_bits().values()) for w in result.layers.values())
    params = sum(w.N * w.K for w in result.layers.values())
    return (total_bits / params if params else float(torch.finfo(next(model.parameters()).dtype).bits)), params


def bits_per_parameter(result, model: torch.nn.Module, lm_head=None, embedding_served: bool = False) -> dict:
    """Stored bits per parameter, saying which tensors count: `decoder_linears` (the quantized linears: codes,
    statistics, outliers, permutation; `average_bits`) and `all` (every parameter of the model, tied ones once: the
    quantized linears as stored plus the others — embeddings, lm_head, norms, biases — at the export dtype), the
    figure to set beside a GGUF file's size. `params_all`: the parameters `all` is over. `lm_head`: the quantized
    lm_head (`LMHeadResult`), counted as stored; a tied one counts once in `params_all`, and the embedding's table
    is stored only if the lookup does not read the lm_head (`embedding_served`: the graph's SpQRGather)."""
    linears, _ = average_bits(result, model)
    layers = dict(result.layers)
    if lm_head is not None:
        layers[lm_head.path] = lm_head.weight
    quantized = {f"{name}.weight" for name in layers}
    stored = sum(sum(w.stored_bits().values()) for w in layers.values())
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    total = 0
    for name, p in model.named_parameters():  # tied parameters once
        if not (lm_head is not None and lm_head.tied and name == f"{lm_head.path}.weight"):
            total += p.numel()
        if embedding_served and p is embedding:
            continue
        if name not in quantized:  # biases too (stored_bits leaves them out)
            stored += p.numel() * torch.finfo(p.dtype).bits
    return {"decoder_linears": linears, "all": stored / total if total else 0.0, "params_all": total}


def attention_record(family, config) -> Optional[dict]:
    """Which layers attend through a sliding window and which have no rotary embedding (`Family.attention`), for
    quant_config.json; None when every layer is global with rope."""
    from qcompiler.models.families import layer_attention

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = layer_attention(family, text)
    local = [i for i, a in enumerate(kinds) if a.sliding_window is not None]
    nope = [i for i, a in enumerate(kinds) if not a.rope]
    if not local and not nope:
        return None
    return {"sliding_window": sorted({kinds[i].sliding_window for i in local}), "local_layers": local,
            "nope_layers": nope}


def export_record(*, source: str, family, method: str, config, method_options: dict, result, model, manifest: dict,
                  memory, proto: onnx.ModelProto, calibration: Optional[dict], lm_head=None,
                  device: Optional[str] = None) -> dict:
    """The content of quant_config.json (before emit adds the library and the validation). `device`: where the
    quantization ran (`--device`)."""
    avg_bits, params = average_bits(result, model)
    served = any(n.op_type == "SpQRGather" and n.domain == "qcompiler" for n in proto.graph.node)
    record = {
        "qcompiler_version": __version__,
        "source": str(Path(source).resolve()) if Path(source).exists() else source,
        "family": family.name,
        "method": method,
        "config": jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else dict(method_options),
        "avg_bits": avg_bits,
        "bits_per_param": bits_per_parameter(result, model, lm_head, embedding_served=served),
        "quantized_params": params,
        "n_quantized_layers": len(result.layers),
        "kv": manifest["kv"],
        "dtype": manifest["dtype"],
        "memory_estimate_gib": round(memory.total / 2**30, 2),
        "fallback_functions": [f.overload for f in proto.functions if f.name == OP_TYPE],
        "contrib_ops": sorted({n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}),
        "layers": jsonable(result.report) if getattr(result, "report", None) else {},
    }
    allocation = getattr(result, "config", {}).get("allocation")
    if isinstance(allocation, dict):  # --target-bits: the realized average and each setting's share
        record["allocation"] = jsonable(allocation)
    if lm_head is not None:
        record["lm_head"] = {**jsonable(lm_head.config), "tied": lm_head.tied, **jsonable(lm_head.report),
                             "embedding": "SpQRGather" if served else "table"}
    attention = attention_record(family, model.config)
    if attention:
        record["attention"] = attention
    if result.transforms:
        kept = [t for t in proto.graph.initializer if t.name.endswith(AFFINE_KEPT_SUFFIXES)]
        record["affine"] = {
            "norm_transforms": len(result.transforms.norms),
            "head_transforms": len(result.transforms.heads),
            "matrices": any(t.matrix for t in result.transforms.norms),
            # what stays in the graph after folding (--ln-matrix): fp32 MatMul weights next to the norms
            "kept_tensors": len(kept),
            "kept_bytes": sum(int(np.prod(t.dims)) * 4 for t in kept),
        }
    if calibration is not None:
        record["calibration"] = calibration
    if device is not None:
        record["device"] = device
    return record


def set_metadata(proto: onnx.ModelProto, record: dict) -> None:
    """The model's metadata_props: method, version, config, average bits (what Netron shows under the model)."""
    props = {"qcompiler.method": record["method"], "qcompiler.version": __version__,
             "qcompiler.config": json.dumps(record["config"]), "qcompiler.avg_bits": f"{record['avg_bits']:.4f}"}
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            proto.metadata_props.add(key=k, value=v)


def write_folder(output: str, *, force: bool, proto: onnx.ModelProto, tokenizer, manifest: dict, record: dict,
                 model: torch.nn.Module, hf_config, family, with_library: bool,
                 tolerance: Optional[validate.Tolerance], accuracy_level: int = 0) -> Optional[dict]:
    """Write and validate the folder (`tolerance` None: not validated); returns the validation record.
    `model`: the PyTorch fake-quant model (validation reference, generation config); `hf_config`, `family`: for
    onnxruntime-genai's config. Raises QCompilerError (after setting the complete folder aside) when validation
    fails."""
    from qcompiler.passes.base import save_model
    from qcompiler.runtime.genai import GENAI_CONFIG_FILE, genai_config

    fused = any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in proto.graph.node)
    genai = genai_config(hf_config, family, manifest["kv"], generation_config=getattr(model, "generation_config", None),
                         library=LIBRARY_FILE if with_library else None, tokenizer=tokenizer,
                         shared_buffer=fused)

    set_metadata(proto, record)
    with atomic_output(output, force=force) as tmp:
        # the weights leave memory as they are written (the proto keeps references to model.onnx.data)
        save_model(proto, str(tmp / MODEL_FILE), consume=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MANIFEST_FILE, manifest)
        if with_library:  # the op library travels with the model (examples/deploy_python.py loads it from OUT)
            from qcompiler.runtime.ops import library_path

            shutil.copy2(library_path(), tmp / LIBRARY_FILE)
            record["op_library"] = LIBRARY_FILE
        if genai is not None:
            write_json(tmp / GENAI_CONFIG_FILE, genai)
        checked = None
        if tolerance is not None:
            checked = validate.check_folder(tmp, model, manifest["kv"], tolerance, accuracy_level=accuracy_level)
            record["validation"] = checked
            if not checked["passed"]:
                write_json(tmp / CONFIG_FILE, record)
                raise QCompilerError(validate.failure_message(checked, set_aside(tmp, output)))
        if accuracy_level:
            record["accuracy_level"] = accuracy_level
        write_json(tmp / CONFIG_FILE, record)
    return checked


def jsonable(obj: Any) -> Any:
    """Plain JSON (RFC 8259): numpy/torch scalars to Python, non-finite floats to the strings "inf"/"-inf"/"nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
