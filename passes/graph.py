"""Small graph-editing helpers shared by the fold passes (on the proto directly: node metadata survives)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.external import borrowed_from, spill, tensor_array

from .base import PassError


class GraphIndex:
    """Producers, consumers and initializers of a graph, with the edits the fold passes make.

    Edits keep the index current; nodes are dropped from the graph by `commit()`.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self._dropped: dict[int, onnx.NodeProto] = {}  # id → node (the reference keeps the id unique)
        self._reindex()

    def refresh(self) -> None:
        """Rebuild producers/consumers after editing node inputs directly."""
        self._reindex()

    def _reindex(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            if id(node) in self._dropped:
                continue
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)

    # ------------------------------------------------------------------------------------------ reading
    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of an initializer (None if `name` is not one)."""
        t = self.inits.get(name)
        return None if t is None else tensor_array(t)

    def const_input(self, node: onnx.NodeProto) -> tuple[Optional[int], Optional[np.ndarray]]:
        """`(index, value)` of a binary node's single constant input, or `(None, None)`."""
        found = [(i, self.const(n)) for i, n in enumerate(node.input) if n in self.inits]
        return found[0] if len(found) == 1 else (None, None)

    def node(self, name: str) -> onnx.NodeProto:
        """The (not removed) node called `name`."""
        for n in self.graph.node:
            if n.name == name and id(n) not in self._dropped:
                return n
        raise PassError(f"node {name} not found")

    def const_of(self, node: onnx.NodeProto) -> np.ndarray:
        """The value of a binary node's single constant input (PassError if it has none or two)."""
        _, value = self.const_input(node)
        if value is None:
            raise PassError(f"{node.name}: expected exactly one constant input")
        return value

    def data_input(self, node: onnx.NodeProto) -> str:
        """The non-constant input of a binary node with one constant input."""
        k, _ = self.const_input(node)
        if k is None:
            raise PassError(f"{node.name}: expected exactly one constant input")
        return node.input[1 - k]

    def users(self, name: str) -> list[onnx.NodeProto]:
        return list(self.consumers.get(name, []))

    def sole_user(self, name: str, op_types: tuple[str, ...]) -> Optional[onnx.NodeProto]:
        users = self.users(name)
        return users[0] if len(users) == 1 and users[0].op_type in op_types else None

    # ------------------------------------------------------------------------------------------ editing
    def set_const(self, name: str, value: np.ndarray, *, like: Optional[str] = None) -> str:
        """Create or overwrite initializer `name` (dtype of `like`'s initializer when given, else of `value`). A value
        replacing or modelled on a borrowed weight (`qcompiler.external`) is borrowed too: its bytes go to a spill
        file next to the exporter's, so folding a whole model's weights does not hold them all in memory."""
        if like is not None:
            value = value.astype(helper.tensor_dtype_to_np_dtype(self.inits[like].data_type))
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name=name)
        source = self.inits.get(like) if like is not None else self.inits.get(name)
        folder = borrowed_from(source) if source is not None else None
        if folder is not None:
            spill(tensor, folder)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]
        return name

    def fresh_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... if a tensor of that name exists."""
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def bypass(self, node: onnx.NodeProto, keep_input: str) -> None:
        """Remove a one-output node, making its consumers (and graph outputs) read `keep_input` instead."""
        out = node.output[0]
        if any(o.name == out for o in self.graph.output):
            raise PassError(f"cannot remove {node.name}: its output {out} is a graph output")
        for user in self.users(out):
            for k, name in enumerate(user.input):
                if name == out:
                    user.input[k] = keep_input
        self._dropped[id(node)] = node
        self._reindex()

    def insert_after(self, tensor: str, node: onnx.NodeProto) -> None:
        """Insert `node` (whose input 0 is `tensor`) so that every current consumer of `tensor` reads its output."""
        for user in self.users(tensor):
            for k, name in enumerate(user.input):
                if name == tensor:
                    user.input[k] = node.output[0]
        self.graph.node.append(node)
        self._reindex()

    def commit(self) -> int:
        """Drop removed nodes and unused initializers, restore topological order; returns
        the number of nodes removed."""
        from .cleanup import _toposort

        nodes = [n for n in self.graph.node if id(n) not in self._dropped]
        removed = len(self.graph.node) - len(nodes)
        nodes = _toposort(nodes, {i.name for i in self.graph.input} | set(self.inits))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        if len(keep) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(keep)
        self._dropped.clear()
        self.inits = {t.name: t for t in self.graph.initializer}
        self._reindex()
        return removed


def namespace(node: onnx.NodeProto) -> str:
    for p in node.metadata_props:
        if p.key == "namespace":
            return p.value
    return ""


def in_module(node: onnx.NodeProto, module: str) -> bool:
    """Whether the exporter attributed `node` to `module` (its namespace names the module path)."""
    ns = namespace(node)
    return f"/{module}:" in ns or f"/model.{module}:" in ns or ns.startswith(f"{module}:")


def make_node(op: str, inputs: list[str], output: str, name: str, module: Optional[str] = None) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, [output], name=name)
    if module:
        node.metadata_props.add(key="namespace", value=f"{module}: qcompiler")
    return node
