"""`drop-identity-reshapes` (passes/drop_identity_reshapes.py): Reshape chains that end in their start's shape are
bypassed, others stay; outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.passes import DropIdentityReshapes, run_pass


def _graph(final_shape, final_dims):
    """x [b, s, 8] → Reshape [b, s, 2, 4] → Reshape final_shape → Relu."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Reshape", ["x", "split"], ["heads"]),
             helper.make_node("Reshape", ["heads", "join"], ["joined"]),
             helper.make_node("Relu", ["joined"], ["y"])]
    inits = [helper.make_tensor("split", TensorProto.INT64, [4], [0, 0, 2, 4]),
             helper.make_tensor("join", TensorProto.INT64, [len(final_shape)], final_shape)]
    info = [helper.make_tensor_value_info("heads", TensorProto.FLOAT, ["b", "s", 2, 4]),
            helper.make_tensor_value_info("joined", TensorProto.FLOAT, final_dims)]
    g = helper.make_graph(nodes, "g", [x], [y], inits, value_info=info)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_identity_chain_is_bypassed_and_outputs_stay():
    model = _graph([0, 0, 8], ["b", "s", 8])
    res = run_pass(DropIdentityReshapes(), model, ensures=True)
    assert res.counts["bypassed"] == 1
    relu = next(n for n in res.model.graph.node if n.op_type == "Relu")
    assert relu.input[0] == "x"
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    assert np.array_equal(_run(res.model, x), _run(model, x))


def test_chains_that_change_the_shape_or_are_unknown_stay():
    for final, dims in (([0, -1], ["b", None]), ([0, 0, 2, 4], ["b", "s", 2, 4]), ([0, 0, 8], ["b", "t", 8])):
        res = run_pass(DropIdentityReshapes(), _graph(final, dims))
        assert res.counts["bypassed"] == 0 and not res.modified, final
