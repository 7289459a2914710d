"""`set-accuracy-level` pass and `qcompiler export --accuracy-level 4`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qcompiler.runtime import ops
from qcompiler.cli import main
from qcompiler.graph.format import DOMAIN, OP_TYPE
from tests.builders import random_weight
from tests.builders import single_op_model
from qcompiler.passes import PassError, PassManager, SetAccuracyLevel, run_pass


def _levels(model: onnx.ModelProto) -> list[int]:
    return [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def test_sets_and_removes_the_attribute():
    w = random_weight(N=40, K=64, bits=3, group_size=16, stat_bits=3, stat_group_size=16, seed=0)
    model = single_op_model(w, x_shape=("m", None))
    p4 = SetAccuracyLevel(4)
    res = run_pass(p4, model, ensures=True)
    assert _levels(res.model) == [4] and res.counts == {"nodes": 1}
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    y = ops.session(res.model.SerializeToString()).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, w.matmul(x), rtol=0, atol=0.05 * float(np.abs(w.matmul(x)).max()))
    p0 = SetAccuracyLevel(0)
    again = run_pass(p0, res.model, ensures=True)
    assert _levels(again.model) == [0] and again.counts == {"nodes": 1}
    assert not any(a.name == "accuracy_level" for a in again.model.graph.node[0].attribute)


def test_rejects_bad_level_and_graphs_without_the_op():
    with pytest.raises(ValueError, match="accuracy level must be one of"):
        SetAccuracyLevel(2)
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(PassError, match="no SpQRMatMul node"):
        PassManager([SetAccuracyLevel(4)]).run(empty)


def test_export_with_accuracy_level_4(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs("llama")), "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--accuracy-level", "4", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["accuracy_level"] == 4
    assert cfg["validation"]["max_abs_logit_diff"] <= cfg["validation"]["limit"]  # level 0, validated
    assert "accuracy_level_max_abs_logit_diff" in cfg["validation"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert set(_levels(model)) == {4}
