"""`replace-linear`: turn each quantized linear (MatMul [+ Add bias], or Gemm transB=1) into `qcompiler::SpQRMatMul`.

Matching is structural plus the export manifest: the manifest names each linear's weight initializer; the node
consuming it as its second input is the linear. Before rewriting, the pass checks that the initializer equals the
weight the quantizer evaluated (`SpQRWeight.dequantize()`), so a wrong module mapping or a graph transform that
moved weights is caught here instead of as a perplexity regression.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import onnx
from onnx import helper

from qcompiler.external import tensor_array
from qcompiler.format import DOMAIN, OP_TYPE, OPSET_VERSION, SpQRWeight
from qcompiler.onnx_op import spqr_node

from .base import Pass, PassError, PassResult


class ReplaceLinear(Pass):
    """Replace quantized linears by SpQRMatMul nodes.

    Args:
        layers: module path → op representation (what the quantizer produced).
        manifest: the exporter's manifest (`manifest["linears"][module]` names the weight/bias initializers).
        atol: largest allowed |initializer − expected weight| (0: exact; the exporter writes fake-quant weights).
        expected: module path → `[N, K]` float32 weight the graph must hold before replacement, when it is not the
            decoded weight: AffineQuant exports the full-precision model and folds its transforms, so the graph then
            holds the transformed weight PyTorch quantized (the same fold functions: equal up to `atol`).
        expected_bias: module path → `[N]` float32 bias the graph must hold (checked like `expected`).
    """

    name = "replace-linear"

    def __init__(self, layers: Mapping[str, SpQRWeight], manifest: dict, *, atol: float = 0.0,
                 expected: Optional[Mapping[str, np.ndarray]] = None,
                 expected_bias: Optional[Mapping[str, np.ndarray]] = None):
        self.layers = dict(layers)
        self.manifest = manifest
        self.atol = atol
        self.expected = dict(expected or {})
        self.expected_bias = dict(expected_bias or {})

    def requires(self, model: onnx.ModelProto) -> None:
        missing = [m for m in self.layers if m not in self.manifest.get("linears", {})]
        if missing:
            raise PassError(f"{len(missing)} quantized modules are not in the export manifest, e.g. {missing[0]}")

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        # new node (and the nodes it replaces) keyed by the id of the node it takes the place of
        replace_at: dict[int, onnx.NodeProto] = {}
        drop: set[int] = set()
        new_inits: list[onnx.TensorProto] = []
        max_err = 0.0
        folded_bias = 0
        for module, weight in self.layers.items():
            entry = self.manifest["linears"][module]
            users = [n for n in consumers.get(entry["weight"], []) if n.op_type in ("MatMul", "Gemm")]
            if len(users) != 1 or users[0].input[1] != entry["weight"]:
                raise PassError(f"{module}: expected one MatMul/Gemm reading {entry['weight']}, found {len(users)}")
            node = users[0]
            w_init = inits[entry["weight"]]
            w_dtype = helper.tensor_dtype_to_np_dtype(w_init.data_type)
            stored = tensor_array(w_init).astype(np.float32)
            if entry["weight_layout"] == "KxN":
                stored = stored.T
            decoded = self.expected[module] if module in self.expected else weight.dequantize()
            if decoded.dtype != w_dtype:
                decoded = decoded.astype(w_dtype).astype(np.float32)
            if stored.shape != decoded.shape:
                raise PassError(f"{module}: weight shape {stored.shape} != quantized {decoded.shape}")
            err = float(np.max(np.abs(stored - decoded))) if stored.size else 0.0
            max_err = max(max_err, err)
            if err > self.atol:
                what = "the weight PyTorch quantized" if module in self.expected else "the quantizer's evaluated weight"
                raise PassError(
                    f"{module}: graph weight differs from {what} by {err:.3g} (> atol {self.atol:g})"
                    + ("" if module in self.expected else "; the model must be exported after quantization")
                )
            out_name = node.output[0]
            bias_name: Optional[str] = entry.get("bias")
            with_bias = weight
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                if node.input[2] != bias_name:
                    raise PassError(f"{module}: Gemm bias {node.input[2]} is not the manifest's {bias_name}")
            elif bias_name is not None:
                add = consumers.get(out_name, [])
                if len(add) == 1 and add[0].op_type == "Add" and bias_name in add[0].input:
                    drop.add(id(add[0]))
                    out_name = add[0].output[0]
                else:
                    bias_name = None
            if bias_name is not None and module in self.expected_bias:
                graph_b = tensor_array(inits[bias_name]).astype(np.float32)
                berr = float(np.max(np.abs(graph_b - self.expected_bias[module]))) if graph_b.size else 0.0
                if graph_b.shape != self.expected_bias[module].shape or berr > self.atol:
                    raise PassError(f"{module}: graph bias differs from the bias PyTorch computed by {berr:.3g}")
            if bias_name is None:
                with_bias = _without_bias(weight)
            elif weight.bias is None:
                raise PassError(f"{module}: the graph has a bias but the quantized layer has none")
            new_node, tensors = spqr_node(with_bias, x=node.input[0], y=out_name, prefix=module, bias_dtype=w_dtype)
            if entry.get("namespace"):
                new_node.metadata_props.add(key="namespace", value=entry["namespace"])
            replace_at[id(node)] = new_node
            new_inits.extend(tensors)
            folded_bias += bias_name is not None

        nodes = []
        for node in graph.node:
            if id(node) in drop:
                continue
            nodes.append(replace_at.get(id(node), node))
        del graph.node[:]
        graph.node.extend(nodes)
        _remove_unused_initializers(graph)
        graph.initializer.extend(new_inits)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
        return PassResult(
            model=model,
            modified=bool(replace_at),
            counts={"replaced": len(replace_at), "bias_folded": folded_bias},
            notes=[f"max |graph weight - decoded| = {max_err:.3g}"],
        )

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        names = {self.manifest["linears"][m]["weight"] for m in self.layers}
        for node in model.graph.node:
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in names:
                raise PassError(f"{node.name} still reads quantized weight {node.input[1]}")
        spqr = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
        if len(spqr) < len(self.layers):
            raise PassError(f"{len(spqr)} SpQRMatMul nodes for {len(self.layers)} quantized layers")


def _without_bias(weight: SpQRWeight) -> SpQRWeight:
    import dataclasses

    return dataclasses.replace(weight, bias=None)


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
