"""Tensors whose bytes stay in a file: the exporter's weights are read from its data file when a pass needs them,
instead of being held in the proto (which would put a second copy of the model in memory next to PyTorch's).

A tensor "borrowed" from a folder is an ONNX external-data tensor whose `basepath` entry (one of the spec's keys)
names that folder. `tensor_array` reads any tensor (inline, or borrowed); `save_with_external_data` writes a model
with its large tensors in one data file, copying borrowed tensors one at a time, so saving never holds all weights.

The passes see borrowed tensors as `ir.ExternalTensor`s whose `base_dir` is the folder (`qcompiler.graph.ir_convert`
maps `basepath` to `base_dir` and back); a pass's new weight replacing one is appended to the folder's spill file
(`qcompiler.graph.edit.set_const`) and becomes an `ir.ExternalTensor` there. This module works on the protos the
exporter and emit hold.
"""

from __future__ import annotations

import os
import sys
from itertools import chain
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data


def _entries(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def borrow(model: onnx.ModelProto, folder: str) -> int:
    """Mark every external tensor of `model` (loaded with `load_external_data=False` from `folder`) as borrowed from
    `folder`. Returns how many tensors were marked."""
    n = 0
    for t in all_tensors(model):
        if uses_external_data(t) and "basepath" not in _entries(t):
            entry = t.external_data.add()
            entry.key, entry.value = "basepath", os.path.abspath(folder)
            n += 1
    return n


def is_borrowed(t: onnx.TensorProto) -> bool:
    return uses_external_data(t) and not t.HasField("raw_data") and "basepath" in _entries(t)


SPILL_FILE = "qcompiler-spill.data"
SIZE_THRESHOLD = 1024  # onnx.save's default: initializers whose raw bytes object is at least this big go external


def goes_external(nbytes: int) -> bool:
    """Whether `onnx.save` (and `spill`, `save_with_external_data`) moves a tensor of `nbytes` raw bytes to the data
    file: its bytes object is at least `SIZE_THRESHOLD` bytes."""
    return sys.getsizeof(b"") + nbytes >= SIZE_THRESHOLD


def spill(t: onnx.TensorProto, folder: str) -> None:
    """Move inline tensor `t`'s bytes to the end of `folder`'s spill file and borrow them from there (a pass's new
    weight replacing a borrowed one stays out of memory too). Only tensors `onnx.save` would move to external data
    (`sys.getsizeof(raw_data) >= SIZE_THRESHOLD`): the saved layout is unchanged."""
    if not t.HasField("raw_data") or not goes_external(len(t.raw_data)):
        return
    with open(os.path.join(folder, SPILL_FILE), "ab") as f:
        offset = f.tell()
        f.write(t.raw_data)
    length = len(t.raw_data)
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SPILL_FILE), ("offset", offset), ("length", length),
                       ("basepath", os.path.abspath(folder))):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)


def file_tensor(name: str, array: np.ndarray, path: str, offset: int) -> onnx.TensorProto:
    """A borrowed tensor named `name` whose bytes are `array`'s, already at `offset` of file `path` (no copy: e.g. a
    weight of an offloaded model's store, `qcompiler.models.offload.file_range`)."""
    t = onnx.TensorProto()
    t.name = name
    t.dims.extend(array.shape)
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", os.path.basename(path)), ("offset", offset), ("length", array.nbytes),
                       ("basepath", os.path.dirname(os.path.abspath(path)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def borrowed_from(t: onnx.TensorProto) -> Optional[str]:
    """The folder borrowed tensor `t` reads from (None when `t` is not borrowed)."""
    return _entries(t)["basepath"] if is_borrowed(t) else None


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    """The raw little-endian bytes of a borrowed tensor, read from its file (bounds checked)."""
    info = _entries(t)
    path = os.path.join(info["basepath"], info["location"])
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"tensor {t.name}: {path} holds {len(raw)} of its {length} bytes at offset {offset}")
    return raw


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """`numpy_helper.to_array` for inline and borrowed tensors alike."""
    if not is_borrowed(t):
        return numpy_helper.to_array(t)
    inline = onnx.TensorProto()
    inline.CopyFrom(t)  # no bytes to copy: a borrowed tensor holds only its metadata
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = tensor_bytes(t)
    return numpy_helper.to_array(inline)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers, then tensor attributes: the order in which `onnx.save` lays out external data."""
    yield from initializer_tensors(model)
    yield from attribute_tensors(model)


def initializer_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers of the main graph, then those of its subgraphs in node order."""
    def walk(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                yield from _subgraphs(a, walk)

    yield from walk(model.graph)


def attribute_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Tensor-valued node attributes (e.g. Constant's value) of the graph and its subgraphs, then of functions."""
    def walk(g) -> Iterator[onnx.TensorProto]:
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                yield from _subgraphs(a, walk)

    yield from walk(model.graph)
    for f in model.functions:
        yield from walk(f)


def _subgraphs(a: onnx.AttributeProto, walk) -> Iterator[onnx.TensorProto]:
    if a.type == onnx.AttributeProto.GRAPH:
        yield from walk(a.g)
    elif a.type == onnx.AttributeProto.GRAPHS:
        for g in a.graphs:
            yield from walk(g)


def save_with_external_data(model: onnx.ModelProto, path: str, *, location: str,
                            size_threshold: int = SIZE_THRESHOLD) -> None:
    """Write `model` to `path` with every initializer of at least `size_threshold` bytes (and every borrowed tensor) in
    `location` next to it, in `all_tensors` order, back to back: the layout `onnx.save(...,
    save_as_external_data=True, all_tensors_to_one_file=True)` writes. `model` is changed in place: its large
    tensors now refer to the new file (their bytes leave memory as they are written)."""
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    # onnx.save moves the initializers above the threshold and leaves attribute tensors inline (borrowed ones
    # have no bytes in memory: they always move)
    moving = chain(((t, True) for t in initializer_tensors(model)), ((t, False) for t in attribute_tensors(model)))
    with open(data_path, "wb") as f:
        for t, initializer in moving:
            if is_borrowed(t):
                raw = tensor_bytes(t)
            elif initializer and t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= size_threshold:
                raw = t.raw_data
            else:
                continue
            offset = f.tell()
            f.write(raw)
            t.ClearField("raw_data")
            del t.external_data[:]  # what onnx's set_external_data writes, which insists on raw_data
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save(model, path)
