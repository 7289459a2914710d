"""Borrowed weights (qcompiler.graph.external): the export leaves the weights in the exporter's file, passes read them
from there, and emit copies them one at a time into exactly the layout `onnx.save` writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.helpers import tiny_model
from qcompiler.graph.export import export_model
from qcompiler.graph.external import all_tensors, borrow, is_borrowed, save_with_external_data, tensor_array
from qcompiler.passes.base import save_model


def _model_with_subgraph_and_function() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big")
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    sub_w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "sub_w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.standard_normal(300).astype(np.float32), "c_value"))
    then = helper.make_graph([helper.make_node("MatMul", ["x", "sub_w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)], [sub_w])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "big"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    nodes = [const, helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64]),
                                           helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [big, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_layout_matches_onnx_save_and_borrowed_tensors_read_back(tmp_path):
    model = _model_with_subgraph_and_function()
    values = {t.name: numpy_helper.to_array(t).copy() for t in all_tensors(model)}
    assert set(values) == {"big", "small", "sub_w", "c_value"}
    ref = tmp_path / "ref"
    ref.mkdir()
    onnx.save(_model_with_subgraph_and_function(), str(ref / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    ours = tmp_path / "ours"
    save_model(model, str(ours / "model.onnx"))
    for name in ("model.onnx", "model.onnx.data"):
        assert (ref / name).read_bytes() == (ours / name).read_bytes(), name
    # borrowed from the saved folder: nothing loaded, each value read from the file on demand
    loaded = onnx.load(str(ours / "model.onnx"), load_external_data=False)
    assert borrow(loaded, str(ours)) == 2  # big, sub_w; "small" and the Constant attribute stay inline
    for t in all_tensors(loaded):
        assert is_borrowed(t) == (t.name in ("big", "sub_w"))
        assert t.HasField("raw_data") != is_borrowed(t)
        np.testing.assert_array_equal(tensor_array(t), values[t.name])
    # saved again elsewhere, the borrowed bytes are copied: same files, and the folder they came from can go
    again = tmp_path / "again"
    save_model(loaded, str(again / "model.onnx"))
    assert sum(map(is_borrowed, all_tensors(loaded))) == 2  # consume=False: untouched
    for name in ("model.onnx", "model.onnx.data"):
        assert (ref / name).read_bytes() == (again / name).read_bytes(), name
    # inline save of a borrowed model carries the bytes into the single file
    save_model(loaded, str(tmp_path / "inline.onnx"), external_data=False)
    inline = onnx.load(str(tmp_path / "inline.onnx"))
    for t in all_tensors(inline):
        assert not t.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(t), values[t.name])


def test_truncated_file_is_an_error(tmp_path):
    model = _model_with_subgraph_and_function()
    save_model(model, str(tmp_path / "model.onnx"))
    loaded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    borrow(loaded, str(tmp_path))
    with open(tmp_path / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="holds .* of its .* bytes"):
        tensor_array(loaded.graph.initializer[0])


def test_borrowed_export_keeps_no_weight_bytes_and_its_folder_lives_with_the_result(tmp_path):
    model = tiny_model("llama")
    inline = export_model(model)
    borrowed = export_model(model, borrow_weights=True)
    folder = borrowed.weights.name
    assert os.path.isdir(folder)
    big = [t for t in all_tensors(borrowed.model) if is_borrowed(t)]
    assert big and all(not t.HasField("raw_data") for t in big)
    assert borrowed.manifest == inline.manifest
    for a, b in zip(all_tensors(inline.model), all_tensors(borrowed.model)):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), tensor_array(b))
    del borrowed
    import gc

    gc.collect()
    assert not os.path.exists(folder)
    assert inline.weights is None


def test_a_pass_replacing_a_borrowed_weight_spills_it_and_the_layout_stays(tmp_path):
    """edit.set_const over a borrowed weight: the new bytes go to the spill file (not kept in the proto), read
    back equal, and the saved model is byte-identical to onnx.save of the same edits made inline."""
    from qcompiler.graph.external import SPILL_FILE
    from qcompiler.graph.edit import set_const
    from qcompiler.graph.ir_convert import to_ir, to_proto

    src = tmp_path / "src"
    save_model(_model_with_subgraph_and_function(), str(src / "model.onnx"))
    borrowed = onnx.load(str(src / "model.onnx"), load_external_data=False)
    borrow(borrowed, str(src))
    inline = _model_with_subgraph_and_function()
    new_big = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    new_small = np.full(4, 2.0, np.float32)
    edited = []
    for model in (borrowed, inline):
        m = to_ir(model)
        g = m.graph
        set_const(g, "big", new_big, like=g.initializers["big"])
        set_const(g, "small", new_small)
        set_const(g, "extra", np.ones((16, 32), np.float32), like=g.initializers["big"])  # modelled on a borrowed weight
        edited.append(to_proto(m))
    borrowed, inline = edited
    tensors = {t.name: t for t in borrowed.graph.initializer}
    assert is_borrowed(tensors["big"]) and is_borrowed(tensors["extra"]) and not tensors["big"].HasField("raw_data")
    assert not is_borrowed(tensors["small"])  # replaced an inline tensor: stays inline
    assert (src / SPILL_FILE).stat().st_size == (64 * 32 + 16 * 32) * 4
    np.testing.assert_array_equal(tensor_array(tensors["big"]), new_big)
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    save_model(inline, str(ref / "model.onnx"))
    save_model(borrowed, str(ours / "model.onnx"))
    for name in ("model.onnx", "model.onnx.data"):
        assert (ref / name).read_bytes() == (ours / name).read_bytes(), name
