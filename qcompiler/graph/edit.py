"""Small graph-editing helpers of the passes, on the onnx-ir object model (`ir.Model`, `ir.Node`, `ir.Value`).

onnx-ir keeps producers and uses current as nodes are edited (`value.producer()`, `value.uses()`,
`ir.convenience.replace_all_uses_with`, `graph.remove`, `graph.insert_before`), so no pass builds an index of its
own. What is here is what onnx-ir does not say in one call: the constant operand of a binary node, a weight
replaced by a value that stays on disk (`set_const`), the stable topological order our exports have always had
(`toposort`), and the exporter's module path of a node (`namespace`, `in_module`).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.graph.external import SPILL_FILE, goes_external


class PassError(RuntimeError):
    """A pass failed (or broke a postcondition). The message names the pass and those that ran before it.
    (Defined with the graph-editing helpers, which raise it; `qcompiler.passes` re-exports it.)"""


STANDARD = ("", "ai.onnx")


# ---------------------------------------------------------------------------------------------------- reading
def is_const(value: Optional[ir.Value]) -> bool:
    """Whether `value` is an initializer (with a value)."""
    return value is not None and value.is_initializer() and value.const_value is not None


def const(value: Optional[ir.Value]) -> Optional[np.ndarray]:
    """The value of an initializer (None if `value` is not one). Borrowed tensors are read from their file."""
    return np.asarray(value.const_value.numpy()) if is_const(value) else None


def const_input(node: ir.Node) -> tuple[Optional[int], Optional[np.ndarray]]:
    """`(index, value)` of a binary node's single constant input, or `(None, None)`."""
    found = [(i, v) for i, v in enumerate(node.inputs) if is_const(v)]
    return (found[0][0], const(found[0][1])) if len(found) == 1 else (None, None)


def const_of(node: ir.Node) -> np.ndarray:
    """The value of a binary node's single constant input (PassError if it has none or two)."""
    _, value = const_input(node)
    if value is None:
        raise PassError(f"{node.name}: expected exactly one constant input")
    return value


def data_input(node: ir.Node) -> ir.Value:
    """The non-constant input of a binary node with one constant input."""
    k, _ = const_input(node)
    if k is None:
        raise PassError(f"{node.name}: expected exactly one constant input")
    return node.inputs[1 - k]


def find_node(graph: ir.Graph, name: str) -> ir.Node:
    """The node called `name`."""
    for n in graph:
        if n.name == name:
            return n
    raise PassError(f"node {name} not found")


def users(value: Optional[ir.Value]) -> list[ir.Node]:
    """The nodes reading `value`, once per input slot that reads it."""
    return [] if value is None else [u.node for u in value.uses()]


def sole_user(value: ir.Value, op_types: tuple[str, ...]) -> Optional[ir.Node]:
    found = users(value)
    return found[0] if len(found) == 1 and found[0].op_type in op_types else None


def produced(value: Optional[ir.Value], op: str) -> Optional[ir.Node]:
    """The standard-domain `op` node producing `value`, else None."""
    n = value.producer() if value is not None else None
    return n if n is not None and n.op_type == op and n.domain in STANDARD else None


def namespace(node: ir.Node) -> str:
    return node.metadata_props.get("namespace", "")


def in_module(node: ir.Node, module: str) -> bool:
    """Whether the exporter attributed `node` to `module` (its namespace names the module path)."""
    ns = namespace(node)
    return f"/{module}:" in ns or f"/model.{module}:" in ns or ns.startswith(f"{module}:")


def fresh_name(graph: ir.Graph, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... if a tensor of that name exists."""
    taken = set(graph.initializers) | {o.name for n in graph for o in n.outputs} | {i.name for i in graph.inputs}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


# ---------------------------------------------------------------------------------------------------- editing
def set_const(graph: ir.Graph, name: str, value: np.ndarray, *, like: Optional[ir.Value] = None) -> ir.Value:
    """Create or overwrite initializer `name` (dtype of `like`'s tensor when given, else of `value`). A value
    replacing or modelled on a borrowed weight (an `ir.ExternalTensor` of the exporter's folder) stays on disk: its
    bytes go to a spill file in that folder (`spill`), so folding a whole model's weights does not hold them all."""
    if like is not None:
        value = value.astype(like.const_value.dtype.numpy())
    value = np.ascontiguousarray(value)
    source = like if like is not None else graph.initializers.get(name)
    folder = borrowed_from(source.const_value) if source is not None else None
    tensor = spill(value, name, folder) if folder is not None else None
    if tensor is None:
        tensor = ir.tensor(value, name=name)
    if name in graph.initializers:
        graph.initializers[name].const_value = tensor
        return graph.initializers[name]
    v = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(v)
    return v


def borrowed_from(tensor) -> Optional[str]:
    """The folder an `ir.ExternalTensor` reads from (its `base_dir`; None for in-memory tensors)."""
    return str(tensor.base_dir) if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir else None


def spill(value: np.ndarray, name: str, folder: str) -> Optional[ir.ExternalTensor]:
    """Append `value`'s bytes to `folder`'s spill file and return an `ir.ExternalTensor` reading them, for tensors
    `onnx.save` would move to external data (`goes_external`; else None: stays inline)."""
    if not goes_external(value.nbytes):
        return None
    raw = value.tobytes()
    with open(os.path.join(folder, SPILL_FILE), "ab") as f:
        offset = f.tell()
        f.write(raw)
    return ir.ExternalTensor(SPILL_FILE, offset, len(raw), ir.DataType.from_numpy(value.dtype),
                             shape=ir.Shape(value.shape), name=name, base_dir=os.path.abspath(folder))


def bypass(graph: ir.Graph, node: ir.Node, keep: ir.Value) -> None:
    """Remove a one-output node, making its readers read `keep` instead."""
    out = node.outputs[0]
    if out.is_graph_output():
        raise PassError(f"cannot remove {node.name}: its output {out.name} is a graph output")
    ir.convenience.replace_all_uses_with(out, keep)
    graph.remove(node, safe=True)


def insert_after(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Add `node` (reading `value`) so that every other reader of `value` reads its output instead; `node` goes to
    the end of the graph (`toposort` puts it in place)."""
    for use in list(value.uses()):
        if use.node is not node:
            use.node.replace_input_with(use.idx, node.outputs[0])
    graph.append(node)


def make_node(op: str, inputs: Sequence[Optional[ir.Value]], output: str, name: str,
              module: Optional[str] = None, *, domain: str = "") -> ir.Node:
    """A one-output node; `module` records the module path in its `namespace` (as the exporter does)."""
    return ir.Node(domain, op, inputs, outputs=[ir.Value(name=output)], name=name,
                   metadata_props={"namespace": f"{module}: qcompiler"} if module else None)


def node_from_proto(proto: onnx.NodeProto, inputs: Sequence[Optional[ir.Value]]) -> ir.Node:
    """An `ir.Node` for a node built with `onnx.helper` (e.g. `qcompiler.graph.onnx_op.spqr_node`), reading
    `inputs` (None for an empty name) and writing new values named as the proto's outputs."""
    return ir.Node(proto.domain, proto.op_type, inputs, [ir.serde.deserialize_attribute(a) for a in proto.attribute],
                   overload=proto.overload, outputs=[ir.Value(name=o) for o in proto.output],
                   name=proto.name or None, doc_string=proto.doc_string or None,
                   metadata_props={p.key: p.value for p in proto.metadata_props} or None)


def copy_value_info(src: ir.Value, dst: ir.Value) -> None:
    """Give `dst` the type, shape and annotations of `src` (which it replaces: its value_info entry survives)."""
    dst.type, dst.shape, dst.doc_string = src.type, src.shape, src.doc_string
    dst.metadata_props.update(src.metadata_props)


def remove_unused_initializers(graph: ir.Graph) -> int:
    """Drop initializers that no node reads and that are no graph output; returns how many."""
    unused = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]
    for name in unused:
        graph.initializers.pop(name)
    return len(unused)


def commit(graph: ir.Graph) -> None:
    """After edits: restore topological order and drop initializers nobody reads."""
    toposort(graph)
    remove_unused_initializers(graph)


def toposort(graph: ir.Graph) -> None:
    """Stable topological order in sweeps: each sweep takes, in order, every node whose inputs are ready (keeps the
    given order where it is valid; the order our exports have always had, unlike `graph.sort()`'s)."""
    available: set = {None, *graph.inputs, *graph.initializers.values()}
    pending = list(graph)
    ordered: list[ir.Node] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in [*n.inputs, *subgraph_inputs(n)]):
                ordered.append(n)
                available.update(n.outputs)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise PassError(f"graph has a cycle or a missing input near node {rest[0].name}")
        pending = rest
    if ordered == list(graph):
        return
    names = [(n.name, [o.name for o in n.outputs]) for n in ordered]  # appending names unnamed nodes and values:
    graph.remove(ordered)                                              # keep them as they were
    graph.extend(ordered)
    for n, (name, outputs) in zip(ordered, names):
        n.name = name
        for o, oname in zip(n.outputs, outputs):
            o.name = oname


def subgraph_inputs(node: ir.Node) -> list[ir.Value]:
    """Outer-scope values read by a node's subgraphs (If/Loop/Scan bodies)."""
    found: list[ir.Value] = []
    for g in _subgraphs(node):
        local = {*g.inputs, *g.initializers.values()}
        for n in g:
            local.update(n.outputs)
            found.extend(v for v in [*n.inputs, *subgraph_inputs(n)] if v is not None and v not in local)
    return found


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def rename_tensors(proto: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Rename initializers (and their uses and value_info entries) by `renames` {old: new}, on a proto (the
    exporter's, before the passes)."""
    if not renames:
        return
    for t in proto.graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in proto.graph.value_info:
        if vi.name in renames:
            vi.name = renames[vi.name]
