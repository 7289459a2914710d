"""`cleanup`: drop dead nodes and unused initializers, toposort, and strip exporter debug metadata.

On the onnx-ir model (whose serialization keeps node doc_strings and metadata, unlike onnx-graphsurgeon's).
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.graph.edit import remove_unused_initializers, subgraph_inputs, toposort
from qcompiler.graph.ir_convert import VALUE_INFO

from .base import Pass, PassError, PassResult

# Exporter-internal metadata that only bloats the file and clutters Netron; `namespace` (module path) is kept.
_DROP_PROPS = ("pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes",
               "pkg.torch.export.graph_signature.InputSpec.kind", "pkg.torch.export.graph_signature.InputSpec.persistent",
               "pkg.torch.onnx.stack_trace")


class Cleanup(Pass):
    """Remove nodes whose outputs reach no graph output, initializers nobody reads, and exporter debug props."""

    name = "cleanup"
    preserves_outputs = True

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        live: set[ir.Node] = set()
        stack = list(graph.outputs)
        seen: set[ir.Value] = set()
        while stack:
            value = stack.pop()
            if value is None or value in seen:
                continue
            seen.add(value)
            node = value.producer()
            if node is None or node in live:
                continue
            live.add(node)
            stack.extend(node.inputs)
            stack.extend(subgraph_inputs(node))
        dead_nodes = [n for n in graph if n not in live]
        graph.remove(dead_nodes, safe=True)
        toposort(graph)
        unused = remove_unused_initializers(graph)

        # value_info entries (kept on the values by onnx-ir) of names no node writes any more
        names = {o.name for n in graph for o in n.outputs} | {i.name for i in graph.inputs}
        listed = graph.meta.get(VALUE_INFO, [])
        kept = [name for name in listed if name in names]
        graph.meta[VALUE_INFO] = kept

        props = 0
        for n in graph:
            for key in _DROP_PROPS:
                if key in n.metadata_props:
                    del n.metadata_props[key]
                    props += 1
        counts = {"dead_nodes": len(dead_nodes), "unused_initializers": unused,
                  "stale_value_info": len(listed) - len(kept), "debug_props": props}
        return PassResult(model=model, modified=any(counts.values()), counts=counts)

    def ensures(self, model: ir.Model, result: PassResult) -> None:
        available = {None, *model.graph.inputs, *model.graph.initializers.values()}
        for node in model.graph:
            for i in node.inputs:
                if i not in available:
                    raise PassError(f"node {node.name} reads {i.name} before it is produced")
            available.update(node.outputs)
