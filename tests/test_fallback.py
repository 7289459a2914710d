"""Portable fallback (qcompiler/graph/fallback.py, passes/add_fallback.py): SpQRMatMul as ONNX functions of standard ops,
run by a stock ONNX Runtime without the op library; with the library registered, ORT runs the library's kernel."""

from __future__ import annotations

import itertools
from collections import Counter
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler.runtime import ops
from qcompiler.graph.fallback import Variant, fallback_function
from qcompiler.graph.format import DOMAIN, OP_TYPE
from tests.builders import random_weight
from tests.builders import single_op_model
from qcompiler.validate import random_feeds

CASES = list(itertools.product([2, 3, 4, 8], [0, 2, 3, 4], [False, True], [False, True], [False, True]))


def _stock(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits,stat_bits,outliers,perm,bias", CASES,
                         ids=[f"w{b}s{s}{'-o' * o}{'-p' * p}{'-b' * bi}" for b, s, o, p, bi in CASES])
def test_function_matches_reference_without_library(bits, stat_bits, outliers, perm, bias):
    # K=100, N=40: ragged packing chunks, groups (β1=16) and statistics groups (β2=16)
    seed = bits * 100 + stat_bits * 10 + outliers * 4 + perm * 2 + bias
    w = random_weight(N=40, K=100, bits=bits, group_size=16, stat_bits=stat_bits, stat_group_size=16,
                      outlier_rate=0.05 if outliers else 0.0, permute=perm, bias=bias, seed=seed)
    dtype = np.float16 if seed % 3 == 0 else np.float32
    model = single_op_model(w, x_dtype=dtype, x_shape=("a", "b", None), fallback=True)
    onnx.checker.check_model(model)
    assert model.graph.node[0].overload == Variant(bits, stat_bits, outliers, perm, bias).overload
    x = np.random.default_rng(seed).normal(size=(2, 3, 100)).astype(dtype)
    y = _stock(model).run(None, {"X": x})[0]
    ref = w.matmul(x).astype(np.float32)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    assert np.abs(y.astype(np.float32) - ref).max() <= tol * np.abs(ref).max()


def test_without_function_stock_ort_rejects_the_model():
    w = random_weight(N=8, K=64, bits=4, group_size=32, seed=0)
    with pytest.raises(Exception, match="SpQRMatMul"):
        _stock(single_op_model(w))


def test_shapes_are_read_from_attributes_so_nodes_share_a_function():
    # two nodes of different K/N and one variant: one function, both nodes right
    from onnx import helper

    from qcompiler.graph.fallback import add_fallback_functions
    from qcompiler.graph.onnx_op import spqr_node

    a = random_weight(N=48, K=40, bits=3, group_size=8, stat_bits=3, outlier_rate=0.1, seed=1)
    b = random_weight(N=24, K=48, bits=3, group_size=32, stat_bits=3, outlier_rate=0.1, seed=2)
    na, ia = spqr_node(a, x="X", y="H", prefix="a")
    nb, ib = spqr_node(b, x="H", y="Y", prefix="b")
    graph = helper.make_graph([na, nb], "two", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 40])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], initializer=ia + ib)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    assert add_fallback_functions(model) == {"w3s3_outliers": 2}
    assert len(model.functions) == 1
    x = np.random.default_rng(0).normal(size=(2, 40)).astype(np.float32)
    ref = b.matmul(a.matmul(x))
    np.testing.assert_allclose(_stock(model).run(None, {"X": x})[0], ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_function_needs_opset_18():
    with pytest.raises(ValueError, match="opset ≥ 18"):
        fallback_function(Variant(3, 3, True, True, True), opset=17)


def _profiled_op_types(model_bytes: bytes, feeds: dict, with_library: bool, tmp_path) -> Counter:
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / ("lib" if with_library else "stock"))
    sess = ops.session(model_bytes, sess_options=opts) if with_library else \
        ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    events = json.loads(open(sess.end_profiling()).read())
    nodes = {e["name"]: e["args"]["op_name"] for e in events
             if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return Counter(nodes.values())


def test_exported_model_runs_without_library_and_library_kernel_is_preferred(tiny_export, tiny_dirs, tmp_path):
    from qcompiler.models.loading import load_model

    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16")
    model = onnx.load(str(folder / "model.onnx"))
    overloads = {n.overload for n in model.graph.node if n.op_type == OP_TYPE}
    # the gate/up nodes apply silu(gate)·up themselves (fuse-silu-mul): a function of their own
    assert overloads == {"w3s0", "w3s0_silu_mul"}
    assert sorted(f.overload for f in model.functions if f.name == OP_TYPE) == ["w3s0", "w3s0_silu_mul"]
    cfg = json.loads((folder / "quant_config.json").read_text())
    assert cfg["fallback_functions"] == ["w3s0", "w3s0_silu_mul"]

    torch_model, _ = load_model(str(tiny_dirs("llama")))
    feeds = random_feeds(torch_model, cfg["kv"])
    data = model.SerializeToString()
    with_lib = ops.session(data).run(["logits"], feeds)[0]
    stock = _stock(model).run(["logits"], feeds)[0]
    assert np.abs(stock - with_lib).max() <= 1e-3
    # ORT's profiler: with the library the nodes run as SpQRMatMul kernels; without it, the function is inlined and
    # (its inputs being initializers) constant-folded into fp32 weights at session creation: plain MatMuls remain
    lib_ops = _profiled_op_types(data, feeds, True, tmp_path)
    stock_ops = _profiled_op_types(data, feeds, False, tmp_path)
    n = len([n for n in model.graph.node if n.op_type == OP_TYPE])
    assert lib_ops[OP_TYPE] == n == 8 and stock_ops[OP_TYPE] == 0  # 14 linears, q/k/v and gate/up fused
    assert stock_ops["MatMul"] == lib_ops["MatMul"] + n


def test_no_fallback_flag(tiny_export):
    folder = tiny_export("llama", "rtn", "--bits", "3", "--group-size", "16", "--no-fallback")
    model = onnx.load(str(folder / "model.onnx"))
    assert not model.functions and all(n.overload == "" for n in model.graph.node)
