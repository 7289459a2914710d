"""`replace-linear`: turn each quantized linear (MatMul [+ Add bias], or Gemm transB=1) into `qcompiler::SpQRMatMul`.

Matching is structural plus the export manifest: the manifest names each linear's weight initializer; the node
consuming it as its second input is the linear. Before rewriting, the pass checks that the initializer equals the
weight the quantizer evaluated (`SpQRWeight.dequantize()`), so a wrong module mapping or a graph transform that
moved weights is caught here instead of as a perplexity regression. The new initializers go to the replaced weight's
file when it is borrowed (`qcompiler.graph.edit.spill`): a whole model's compressed layers never sit in memory.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.graph.edit import (borrowed_from, const, copy_value_info, node_from_proto, remove_unused_initializers,
                                  spill, users)
from qcompiler.graph.format import DOMAIN, OP_TYPE, OPSET_VERSION, SpQRWeight
from qcompiler.graph.onnx_op import spqr_node

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

    def requires(self, model: ir.Model) -> None:
        missing = [m for m in self.layers if m not in self.manifest.get("linears", {})]
        if missing:
            raise PassError(f"{len(missing)} quantized modules are not in the export manifest, e.g. {missing[0]}")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        inits = graph.initializers
        replaced = 0
        max_err = 0.0
        folded_bias = 0
        for module, weight in self.layers.items():
            entry = self.manifest["linears"][module]
            w_value = inits.get(entry["weight"])
            found = [n for n in users(w_value) if n.op_type in ("MatMul", "Gemm")]
            if len(found) != 1 or found[0].inputs[1] is not w_value:
                raise PassError(f"{module}: expected one MatMul/Gemm reading {entry['weight']}, found {len(found)}")
            node = found[0]
            w_dtype = w_value.const_value.dtype.numpy()
            stored = const(w_value).astype(np.float32)
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
            out = node.outputs[0]
            replaced_nodes = [node]
            bias_name: Optional[str] = entry.get("bias")
            with_bias = weight
            gemm_bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if gemm_bias is not None:
                if gemm_bias.name != bias_name:
                    raise PassError(f"{module}: Gemm bias {gemm_bias.name} is not the manifest's {bias_name}")
            elif bias_name is not None:
                add = users(out)
                if len(add) == 1 and add[0].op_type == "Add" and bias_name in [i.name for i in add[0].inputs if i]:
                    replaced_nodes.append(add[0])
                    out = add[0].outputs[0]
                else:
                    bias_name = None
            if bias_name is not None and module in self.expected_bias:
                graph_b = const(inits[bias_name]).astype(np.float32)
                berr = float(np.max(np.abs(graph_b - self.expected_bias[module]))) if graph_b.size else 0.0
                if graph_b.shape != self.expected_bias[module].shape or berr > self.atol:
                    raise PassError(f"{module}: graph bias differs from the bias PyTorch computed by {berr:.3g}")
            if bias_name is None:
                with_bias = _without_bias(weight)
            elif weight.bias is None:
                raise PassError(f"{module}: the graph has a bias but the quantized layer has none")
            proto, tensors = spqr_node(with_bias, x=node.inputs[0].name, y=out.name, prefix=module, bias_dtype=w_dtype)
            if entry.get("namespace"):
                proto.metadata_props.add(key="namespace", value=entry["namespace"])
            values = {}
            folder = borrowed_from(w_value.const_value)  # the replaced weight's file: the new ones go there too
            for t in tensors:  # after the graph's own initializers (the unused ones are dropped below)
                tensor = spill(onnx.numpy_helper.to_array(t), t.name, folder) if folder is not None else None
                values[t.name] = ir.Value(name=t.name, const_value=tensor or ir.serde.deserialize_tensor(t))
                graph.register_initializer(values[t.name])
            new_node = node_from_proto(proto, [node.inputs[0], *(values.get(n) for n in proto.input[1:])])
            copy_value_info(out, new_node.outputs[0])  # the output keeps its name, and its value_info entry
            graph.insert_before(node, new_node)  # in the MatMul's place
            ir.convenience.replace_all_uses_with(out, new_node.outputs[0], replace_graph_outputs=True)
            graph.remove(replaced_nodes, safe=True)
            replaced += 1
            folded_bias += bias_name is not None

        remove_unused_initializers(graph)  # the replaced weights (the new ones stay last, as they were added)
        if DOMAIN not in model.opset_imports:
            model.opset_imports[DOMAIN] = OPSET_VERSION
        return PassResult(
            model=model,
            modified=bool(replaced),
            counts={"replaced": replaced, "bias_folded": folded_bias},
            notes=[f"max |graph weight - decoded| = {max_err:.3g}"],
        )

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        names = {self.manifest["linears"][m]["weight"] for m in self.layers}
        for node in model.graph:
            if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None \
                    and node.inputs[1].name in names:
                raise PassError(f"{node.name} still reads quantized weight {node.inputs[1].name}")
        spqr = [n for n in model.graph if n.op_type == OP_TYPE and n.domain == DOMAIN]
        if len(spqr) < len(self.layers):
            raise PassError(f"{len(spqr)} SpQRMatMul nodes for {len(self.layers)} quantized layers")


def _without_bias(weight: SpQRWeight) -> SpQRWeight:
    import dataclasses

    return dataclasses.replace(weight, bias=None)
