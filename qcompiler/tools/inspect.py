"""`qcompiler inspect`: what an exported folder holds, per SpQRMatMul node (shape, bits, outliers, bytes), from the
graph and the initializers' shapes only (the weight data is not read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from qcompiler import QCompilerError
from qcompiler.folder import MODEL_FILE
from qcompiler.graph.format import DOMAIN, INPUT_NAMES, OP_TYPE
from qcompiler.graph.onnx_op import node_parts


@dataclasses.dataclass
class LayerInfo:
    """One SpQRMatMul node.

    Attributes:
        name: node name (module path + "/SpQRMatMul"; a node serving sibling linears names them all, e.g.
            `model.layers.0.mlp.gate_proj+up_proj/SpQRMatMul`).
        N, K, bits, group_size, stat_bits, stat_group_size: the node's attributes.
        outliers: stored outliers (0 without the CSR inputs).
        permuted: the node has an act-order permutation.
        bytes: bytes of its initializers (codes, statistics, outliers, permutation, bias).
        accuracy_level: the node's accuracy_level attribute (0 when absent).
        linears: the linears the node computes (`qcompiler.graph.onnx_op.node_parts`).
    """

    name: str
    N: int
    K: int
    bits: int
    group_size: int
    stat_bits: int
    stat_group_size: int
    outliers: int
    permuted: bool
    bytes: int
    accuracy_level: int
    linears: int = 1

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes / (self.N * self.K)

    @property
    def outlier_share(self) -> float:
        return self.outliers / (self.N * self.K)


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def model_file(path: str | Path) -> Path:
    """`path` itself (a model.onnx) or `path/model.onnx` (an export folder); QCompilerError if it is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise QCompilerError(f"{path} not found (expected a `qcompiler export` output folder or a model.onnx)")
    return path


def inspect_model(path: str | Path) -> tuple[list[LayerInfo], dict[str, str], int]:
    """(per-node info, metadata_props, total initializer bytes) of `path` (a model.onnx or its folder)."""
    model = onnx.load(str(model_file(path)), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        named = dict(zip(INPUT_NAMES, list(node.input) + [""] * (len(INPUT_NAMES) - len(node.input))))
        col = inits.get(named.get("outlier_col_idx", ""))
        layers.append(LayerInfo(
            name=node.name, N=int(attrs["N"]), K=int(attrs["K"]), bits=int(attrs["bits"]),
            group_size=int(attrs["group_size"]), stat_bits=int(attrs["stat_bits"]),
            stat_group_size=int(attrs["stat_group_size"]),
            outliers=int(col.dims[0]) if col is not None else 0,
            permuted=bool(named.get("perm")),
            bytes=sum(_nbytes(inits[i]) for i in node.input[1:] if i in inits),
            accuracy_level=int(attrs.get("accuracy_level", 0)),
            linears=len(node_parts(node)),
        ))
    total = sum(_nbytes(t) for t in model.graph.initializer)
    return layers, {p.key: p.value for p in model.metadata_props}, total


def render(layers: list[LayerInfo], metadata: dict[str, str], total_bytes: int, *, limit: Optional[int] = None) -> str:
    lines = []
    for k in sorted(metadata):
        if k.startswith("qcompiler."):
            lines.append(f"{k}: {metadata[k]}")
    if lines:
        lines.append("")
    head = f"{'node':<44} {'N x K':>13} {'bits':>4} {'β1':>4} {'stats':>9} {'outliers':>9} {'bits/param':>10} {'bytes':>11}"
    lines += [head, "-" * len(head)]
    shown = layers if limit is None else layers[:limit]
    for li in shown:
        stats = f"{li.stat_bits}b/{li.stat_group_size}" if li.stat_bits else "fp16"
        lines.append(f"{li.name[:44]:<44} {f'{li.N}x{li.K}':>13} {li.bits:>4} {li.group_size:>4} {stats:>9} "
                     f"{100 * li.outlier_share:>8.2f}% {li.bits_per_param:>10.3f} {li.bytes:>11,}")
    if limit is not None and len(layers) > limit:
        lines.append(f"... {len(layers) - limit} more nodes")
    params = sum(li.N * li.K for li in layers)
    qbytes = sum(li.bytes for li in layers)
    lines.append("-" * len(head))
    if layers:
        lines.append(f"{len(layers)} SpQRMatMul nodes ({sum(li.linears for li in layers)} linears), {params:,} quantized parameters, {qbytes:,} bytes "
                     f"({8 * qbytes / params:.3f} bits/param), outliers "
                     f"{100 * sum(li.outliers for li in layers) / params:.2f}%")
    else:
        lines.append("no SpQRMatMul nodes")
    lines.append(f"all initializers: {total_bytes:,} bytes ({total_bytes / 1e6:.1f} MB); the rest "
                 f"({(total_bytes - qbytes) / 1e6:.1f} MB) is unquantized (embeddings, norms, ...)")
    return "\n".join(lines)


def deployment_summary(path: str | Path) -> list[str]:
    """What a deployment of `path` (an export folder or model.onnx) gets: graph dtype, the portable fallback
    functions, and the files next to the model (op library copy, genai_config.json)."""
    onnx_file = model_file(path)
    folder = onnx_file.parent
    model = onnx.load(str(onnx_file), load_external_data=False)
    outputs = {o.name: o for o in model.graph.output}
    logits = outputs.get("logits")
    dtype = (helper.tensor_dtype_to_np_dtype(logits.type.tensor_type.elem_type).name if logits is not None
             else "unknown")
    overloads: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            overloads[node.overload or "(none)"] = overloads.get(node.overload or "(none)", 0) + 1
    defined = {f.overload for f in model.functions if f.domain == DOMAIN and f.name == OP_TYPE}
    if defined:
        fallback = ", ".join(f"{o} ({n} nodes)" for o, n in sorted(overloads.items()) if o in defined)
        fallback += "" if set(overloads) <= defined else " — some nodes have no function"
    else:
        fallback = "none (needs the op library; exported with --no-fallback or by an older qcompiler)"
    lines = [f"graph dtype: {dtype}",
             f"portable fallback functions: {fallback}",
            f"op library in folder: {'libqcompiler_ops.so' if (folder / 'libqcompiler_ops.so').is_file() else 'no'}",
             f"onnxruntime-genai config: {'genai_config.json' if (folder / 'genai_config.json').is_file() else 'no'}"]
    allocation = allocation_summary(folder)
    if allocation:
        lines.append(allocation)
    return lines


def allocation_summary(folder: Path) -> Optional[str]:
    """`--target-bits` exports: the realized average and each setting's share, from quant_config.json (the
    per-node bits, β1 and statistics above show which setting each linear got), else None."""
    import json

    from qcompiler.quantize.allocation import describe

    try:
        record = json.loads((folder / "quant_config.json").read_text())
    except (OSError, ValueError):
        return None
    allocation = record.get("allocation")
    return describe(allocation) if isinstance(allocation, dict) else None
