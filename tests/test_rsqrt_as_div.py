"""`rsqrt-as-div` pass: RMSNorm's `x · Reciprocal(Sqrt(v))` as `x / Sqrt(v)`, which ONNX Runtime fuses."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import tiny_model
from qcompiler.graph.export import export_model
from qcompiler.validate import random_feeds
from qcompiler.passes import PassContext, PassManager, RsqrtAsDiv, run_pass


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Op types of `model` after ONNX Runtime's default (full) graph optimisation on the CPU EP."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    exported = export_model(model)
    return model, exported


def test_rmsnorms_rewritten_and_fused_by_onnxruntime(llama, tmp_path):
    model, exported = llama
    before = copy.deepcopy(exported.model)
    norms = 2 * model.config.num_hidden_layers + 1  # input and post-attention norm per layer, the final norm
    ops_before = Counter(n.op_type for n in before.graph.node)
    assert ops_before["Reciprocal"] == norms  # the exporter's rsqrt

    feeds = random_feeds(model, exported.manifest["kv"])
    ctx = PassContext(verify_each=True, verify_feeds=feeds, verify_atol=1e-5)  # outputs checked in ORT as well
    run = PassManager([RsqrtAsDiv()], context=ctx).run(copy.deepcopy(before))
    res = run.steps[0][1]
    after = run.model
    ops_after = Counter(n.op_type for n in after.graph.node)
    assert res.modified and res.counts == {"rewritten": norms}
    assert ops_after["Reciprocal"] == 0 and ops_after["Div"] == ops_before["Div"] + norms
    assert ops_after["Mul"] == ops_before["Mul"] - norms
    assert len(after.graph.node) == len(before.graph.node) - norms
    onnx.checker.check_model(after)

    # the point of the pass: ONNX Runtime now fuses every norm into one kernel
    assert _optimized_ops(before, tmp_path)["SimplifiedLayerNormalization"] == 0
    assert _optimized_ops(after, tmp_path)["SimplifiedLayerNormalization"] == norms

    # logits as PyTorch's, and as the graph's before (fp32 rounding apart)
    sess_b = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_a = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
    got_b, got_a = (s.run(["logits"], feeds)[0] for s in (sess_b, sess_a))
    np.testing.assert_allclose(got_a, got_b, rtol=0, atol=1e-5)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 128, size=(1, 9)))
    plain = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 9), np.int64),
             "position_ids": np.arange(9, dtype=np.int64)[None]}
    plain.update({k: v[:, :, :0] for k, v in feeds.items() if k.startswith("past_key_values")})
    plain = {k: v[:1] for k, v in plain.items()}
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(sess_a.run(["logits"], plain)[0] - ref).max() <= 1e-4

    again = run_pass(RsqrtAsDiv(), after)  # idempotent
    assert not again.modified and again.counts == {"rewritten": 0}


def _graph(nodes, outputs=("y",), inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("order", ["x_first", "rsqrt_first"])
def test_either_operand_order(order):
    v = numpy_helper.from_array(np.full((2, 1), 4.0, np.float32), "v")
    mul_in = ["x", "r"] if order == "x_first" else ["r", "x"]
    model = _graph([helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"], name="rs"),
                    helper.make_node("Mul", mul_in, ["y"])], inits=[v])
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    res = run_pass(RsqrtAsDiv(), copy.deepcopy(model), ensures=True)
    assert [(n.op_type, list(n.input), n.name) for n in res.model.graph.node] == [
        ("Sqrt", ["v"], ""), ("Div", ["x", "s"], "rs")]
    np.testing.assert_allclose(_run(res.model, x)[0], x / 2, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["two_consumers", "not_sqrt", "graph_output", "squared"])
def test_left_alone(case):
    v = numpy_helper.from_array(np.full((2, 1), 4.0, np.float32), "v")
    src = "Sqrt" if case != "not_sqrt" else "Abs"
    nodes = [helper.make_node(src, ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"])]
    outputs = ["y"]
    if case == "squared":  # the Mul reads the reciprocal twice: 1 / v, not x / sqrt(v)
        nodes.append(helper.make_node("Mul", ["r", "r"], ["y"]))
    else:
        nodes.append(helper.make_node("Mul", ["x", "r"], ["y"]))
    if case == "two_consumers":
        nodes.append(helper.make_node("Add", ["x", "r"], ["z"]))
        outputs.append("z")
    if case == "graph_output":
        outputs.append("r")
    model = _graph(nodes, outputs=outputs, inits=[v])
    res = run_pass(RsqrtAsDiv(), copy.deepcopy(model))
    assert not res.modified and res.counts == {"rewritten": 0}
    assert [n.op_type for n in res.model.graph.node] == [n.op_type for n in model.graph.node]


def test_layernorm_models_untouched():
    exported = export_model(tiny_model("opt"))
    res = run_pass(RsqrtAsDiv(), exported.model)
    assert not res.modified and res.counts == {"rewritten": 0}
