"""`fuse-skip-norm` (passes/fuse_skip_norm.py): a residual Add and the RMSNorm reading it become one
SkipSimplifiedLayerNormalization whose sum output feeds the other readers; outputs equal within fp32 rounding;
anything else stays."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.passes import FuseSkipNorm, run_pass

H = 16


def _graph(exponent: float = 2.0, weight_len: int = H):
    """y = RMSNorm(a + b) · w; z = (a + b) + y (the next residual reads the sum)."""
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H]) for n in ("y_out", "z")]
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, weight_len).astype(np.float32), "w")]
    nodes = [helper.make_node("Add", ["a", "b"], ["r"]),
             helper.make_node("Pow", ["r", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["std"]),
             helper.make_node("Div", ["r", "std"], ["normed"]),
             helper.make_node("Mul", ["normed", "w"], ["y"]),
             helper.make_node("Add", ["r", "y"], ["z"]),
             helper.make_node("Identity", ["y"], ["y_out"])]
    info = [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "s", H])]
    g = helper.make_graph(nodes, "g", vi, out, inits, value_info=info)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_fused_and_equal():
    model = _graph()
    res = run_pass(FuseSkipNorm(), model, ensures=True)
    assert res.counts["fused"] == 1
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == ["SkipSimplifiedLayerNormalization", "Add", "Identity"]
    fused = res.model.graph.node[0]
    assert list(fused.input) == ["a", "b", "w"] and len(fused.output) == 4
    assert list(res.model.graph.node[1].input) == [fused.output[3], fused.output[0]]  # sum and normed value
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 3, H)).astype(np.float32) for n in ("a", "b")}
    for got, want in zip(_run(res.model, feeds), _run(model, feeds)):
        assert np.abs(got - want).max() <= 1e-5


def test_other_forms_stay():
    for model in (_graph(exponent=3.0), _graph(weight_len=1)):
        res = run_pass(FuseSkipNorm(), model)
        assert res.counts["fused"] == 0 and [n.op_type for n in res.model.graph.node] == \
            [n.op_type for n in model.graph.node]
