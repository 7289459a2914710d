"""`cleanup`: drop dead nodes and unused initializers, toposort, and strip exporter debug metadata.

Works on the proto directly (not through onnx-graphsurgeon) so node doc_strings and metadata survive.
"""

from __future__ import annotations

import onnx

from .base import PassError, PassResult, Pass

# Exporter-internal metadata that only bloats the file and clutters Netron; `namespace` (module path) is kept.
_DROP_PROPS = ("pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes",
               "pkg.torch.export.graph_signature.InputSpec.kind", "pkg.torch.export.graph_signature.InputSpec.persistent",
               "pkg.torch.onnx.stack_trace")


class Cleanup(Pass):
    """Remove nodes whose outputs reach no graph output, initializers nobody reads, and exporter debug props."""

    name = "cleanup"
    preserves_outputs = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        producers = {o: n for n in graph.node for o in n.output if o}
        live: set[int] = set()
        stack = [o.name for o in graph.output]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producers.get(name)
            if node is None or id(node) in live:
                continue
            live.add(id(node))
            stack.extend(i for i in node.input if i)
            stack.extend(_subgraph_inputs(node))
        nodes = [n for n in graph.node if id(n) in live]
        dead = len(graph.node) - len(nodes)
        nodes = _toposort(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer})
        del graph.node[:]
        graph.node.extend(nodes)

        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        used |= {i for n in graph.node for i in _subgraph_inputs(n)}
        keep = [t for t in graph.initializer if t.name in used]
        unused = len(graph.initializer) - len(keep)
        if unused:
            del graph.initializer[:]
            graph.initializer.extend(keep)
        names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        vi = [v for v in graph.value_info if v.name in names]
        stale_vi = len(graph.value_info) - len(vi)
        del graph.value_info[:]
        graph.value_info.extend(vi)

        props = 0
        for n in graph.node:
            keep_props = [p for p in n.metadata_props if p.key not in _DROP_PROPS]
            if len(keep_props) != len(n.metadata_props):
                props += len(n.metadata_props) - len(keep_props)
                del n.metadata_props[:]
                n.metadata_props.extend(keep_props)
        counts = {"dead_nodes": dead, "unused_initializers": unused, "stale_value_info": stale_vi,
                  "debug_props": props}
        return PassResult(model=model, modified=any(counts.values()), counts=counts)

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
        for node in model.graph.node:
            for i in node.input:
                if i not in available:
                    raise PassError(f"node {node.name} reads {i} before it is produced")
            available.update(node.output)


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names read by a node's subgraphs (If/Loop/Scan bodies)."""
    names: list[str] = []
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
                names.extend(i for i in n.input if i and i not in local)
    return names


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable topological order (keeps the given order where it is already valid)."""
    available = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            needs = [i for i in n.input if i] + _subgraph_inputs(n)
            if all(i in available for i in needs):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise PassError(f"graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    return ordered
