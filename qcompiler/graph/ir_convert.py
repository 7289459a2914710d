"""The one crossing between protobuf and onnx-ir: the passes work on an `ir.Model`, the exporter and emit on a
`onnx.ModelProto`. `to_ir` and `to_proto` round-trip an exported model byte for byte:

- borrowed tensors (`qcompiler.graph.external`: external data with a `basepath` entry) become `ir.ExternalTensor`s
  whose `base_dir` is that folder, and come back with the same `location`/`offset`/`length`/`basepath` entries, so
  their bytes stay in the exporter's (or the spill) file the whole way;
- `value_info` lists what it listed before, in the same order: onnx-ir writes type information for initializers too
  (dropped again) and in node order (entries are put back in the input's order; new ones follow);
- the model's `metadata_props` keep the input's order (onnx-ir keeps them in a dict).

Everything else (nodes with their `metadata_props`, initializers, inputs, outputs, functions, opsets) is what
`onnx_ir.serde` writes, which reproduces the exporter's protos exactly.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qcompiler.graph.external import all_tensors, borrowed_from

# keys of `ir.Model.meta` / `ir.Graph.meta` (kept in memory, never serialized)
VALUE_INFO = "qcompiler.value_info"  # names of the main graph's value_info entries, in the input's order
METADATA_ORDER = "qcompiler.metadata_order"  # keys of the model's metadata_props, in the input's order


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    """`proto` as an `ir.Model` (inline tensors are wrapped, not copied; borrowed ones stay in their files)."""
    model = ir.serde.deserialize_model(proto)
    borrowed = [(t.name, folder) for t in all_tensors(proto) if (folder := borrowed_from(t)) is not None]
    by_name = dict(borrowed)
    folders = {folder for _, folder in borrowed}
    for tensor, owner in _external_tensors(model):
        folder = by_name.get(tensor.name) if tensor.name else None
        if folder is None and len(folders) == 1:
            folder = next(iter(folders))
        if folder is not None:
            owner(borrowed_tensor(tensor, folder))
    model.graph.meta[VALUE_INFO] = [vi.name for vi in proto.graph.value_info]
    model.meta[METADATA_ORDER] = [p.key for p in proto.metadata_props]
    return model


def borrowed_tensor(tensor: ir.ExternalTensor, folder: str) -> ir.ExternalTensor:
    """`tensor` read from `folder` (the `basepath` of a borrowed tensor)."""
    return ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                             name=tensor.name, doc_string=tensor.doc_string,
                             metadata_props=dict(tensor.metadata_props), base_dir=folder)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """`model` as a `onnx.ModelProto` (external tensors as references: no bytes are read)."""
    proto = ir.serde.serialize_model(model)
    folders = {t.name: str(t.base_dir) for t, _ in _external_tensors(model) if t.base_dir}
    default = set(folders.values())
    for t in all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL or any(e.key == "basepath" for e in t.external_data):
            continue
        folder = folders.get(t.name) or (next(iter(default)) if len(default) == 1 and not t.name else None)
        if folder:
            entry = t.external_data.add()
            entry.key, entry.value = "basepath", folder
    graph = proto.graph
    hidden = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    order = {name: k for k, name in enumerate(model.graph.meta.get(VALUE_INFO, []))}
    entries = [vi for vi in graph.value_info if vi.name not in hidden or vi.name in order]
    entries.sort(key=lambda vi: order.get(vi.name, len(order)))  # stable: new entries keep node order
    _replace(graph.value_info, entries)
    keys = {k: n for n, k in enumerate(model.meta.get(METADATA_ORDER, []))}
    if keys:
        props = sorted(proto.metadata_props, key=lambda p: keys.get(p.key, len(keys)))
        _replace(proto.metadata_props, props)
    return proto


def _replace(field, items) -> None:
    kept = [type(i)() for i in items]
    for new, old in zip(kept, items):
        new.CopyFrom(old)
    del field[:]
    field.extend(kept)


def _external_tensors(model: ir.Model):
    """`(tensor, setter)` for every `ir.ExternalTensor` of `model`: initializers of all graphs, tensor attributes."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value, lambda t, v=value: setattr(v, "const_value", t)
        for node in graph:
            for name, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value, lambda t, n=node, k=name: n.attributes.__setitem__(k, ir.AttrTensor(k, t))
