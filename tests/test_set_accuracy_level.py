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


def test_measured_defaults_per_method():
    # int8 activations by default only where their perplexity cost was measured under 0.5 % (4-bit SpQR codes)
    from qcompiler.quantize.methods import get_method

    spqr = get_method("spqr")
    assert spqr.default_accuracy_level(spqr.Config()) == 4
    assert spqr.default_accuracy_level(spqr.Config(), lm_head=True) == 4
    sub4 = spqr.Config(**spqr.presets["sub4"])
    assert spqr.default_accuracy_level(sub4) == 4 and spqr.default_accuracy_level(sub4, lm_head=True) == 0
    assert spqr.default_accuracy_level(spqr.Config(bits=2)) == 0
    for name in ("rtn", "gptq", "affinequant", "affinequant+spqr"):
        method = get_method(name)
        assert method.default_accuracy_level(method.Config()) == 0, name


@pytest.mark.parametrize("flags,level", [((), 4), (("--preset", "sub4"), 4), (("--preset", "sub4", "--lm-head", "rtn"), 0),
                                         (("--accuracy-level", "0"), 0)])
def test_spqr_export_default_accuracy_level(flags, level, tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs("llama")), "--method", "spqr", *flags, "--nsamples", "4", "--seqlen", "32",
                 "--calibration", str(text_file), "-o", str(out)]) == 0
    said = capsys.readouterr()
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg.get("accuracy_level", 0) == level
    assert set(_levels(onnx.load(str(out / "model.onnx"), load_external_data=False))) == {level}
    assert ("int8 activations on CPU (accuracy level 4" if level else "fp32 activations") in said.out + said.err
    from qcompiler.runtime.generate import Generator

    assert ("SpQRMatMul activations: int8" if level else "SpQRMatMul activations: fp32") in Generator(out).describe()
    # the lm_head: 4-bit codes quantize it by default (--lm-head auto: the 8-bit rtn table); sub4 keeps it unless asked
    head = cfg.get("lm_head")
    assert (head is not None) == ("sub4" not in flags or "--lm-head" in flags)
    if head is not None:
        assert (head["method"], head["bits"], head["group_size"]) == ("rtn", 8, 128)
        assert "the default of this method" in said.out + said.err or "--lm-head" in flags
