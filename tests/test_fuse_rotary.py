"""`fuse-rotary` pass: each exported rotary embedding as one `com.microsoft::RotaryEmbedding` node."""

from __future__ import annotations

import copy
import json
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
from qcompiler.passes import Cleanup, FuseRotary, PassContext, PassManager, run_pass

MS = "com.microsoft"


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _sess(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def exported(request):
    model = tiny_model(request.param)
    return model, export_model(model)


def test_fused_tables_and_logits(exported, tmp_path):
    model, ex = exported
    cfg = model.config
    before = copy.deepcopy(ex.model)
    feeds = random_feeds(model, ex.manifest["kv"])  # a past of 3: positions 3 .. 10
    ctx = PassContext(verify_each=True, verify_feeds=feeds, verify_atol=1e-5)  # outputs checked in ORT as well
    run = PassManager([FuseRotary(cfg.max_position_embeddings), Cleanup()], context=ctx).run(copy.deepcopy(before))
    res = run.steps[0][1]
    after = run.model
    layers = cfg.num_hidden_layers
    assert res.counts == {"fused": 2 * layers, "tables": 1} and res.notes == []  # q and k per layer, one table
    fused = [n for n in after.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(fused) == 2 * layers and all(n.domain == MS for n in fused)
    assert {n.input[1] for n in fused} == {"position_ids"}
    ops_b, ops_a = _ops(before), _ops(after)
    assert ops_b["Neg"] == 2 * layers and ops_a["Neg"] == 0 and ops_a["Sin"] == ops_a["Cos"] == 0
    assert ops_a["Slice"] == ops_b["Slice"] - 4 * layers
    assert sum(ops_a.values()) < sum(ops_b.values()) - 6 * 2 * layers
    assert any(o.domain == MS for o in after.opset_import)

    # the tables are the graph's own angles: cos/sin(position · inv_freq) for every position
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    head = cfg.hidden_size // cfg.num_attention_heads
    cos, sin = inits[fused[0].input[2]], inits[fused[0].input[3]]
    assert cos.shape == sin.shape == (cfg.max_position_embeddings, head // 2) and cos.dtype == np.float32
    inv = model.model.rotary_emb.inv_freq.numpy()
    angles = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None] * inv[None]
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=2e-6)

    # logits: as the graph's before (rounding apart), decode step with a past; and as PyTorch's
    got_b, got_a = (_sess(m).run(["logits"], feeds)[0] for m in (before, after))
    np.testing.assert_allclose(got_a, got_b, rtol=0, atol=1e-5)
    ids = np.random.default_rng(1).integers(0, 128, size=(1, 9))
    plain = {"input_ids": ids, "attention_mask": np.ones((1, 9), np.int64),
             "position_ids": np.arange(9, dtype=np.int64)[None]}
    plain.update({k: v[:1, :, :0] for k, v in feeds.items() if k.startswith("past_key_values")})
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(_sess(after).run(["logits"], plain)[0] - ref).max() <= 1e-4

    # positions past the table: an error of the node, not silent garbage
    far = dict(plain, position_ids=plain["position_ids"] + cfg.max_position_embeddings)
    with pytest.raises(Exception, match="out of range"):
        _sess(after).run(["logits"], far)

    again = run_pass(FuseRotary(cfg.max_position_embeddings), after)  # idempotent
    assert not again.modified and again.counts["fused"] == 0


def test_layernorm_family_and_fp16_graphs_untouched():
    opt = export_model(tiny_model("opt")).model
    res = run_pass(FuseRotary(256), opt)
    assert not res.modified and res.counts["fused"] == 0
    half = export_model(torch.nn.Module.half(tiny_model("llama"))).model  # a Cast between Cos and Unsqueeze
    res = run_pass(FuseRotary(256), half)
    assert not res.modified and res.counts["fused"] == 0
    assert not any(n.domain == MS for n in res.model.graph.node)


def _rotary_graph(angle_inputs):
    """x [1, 2, S, 4] rotated as the exporter writes it, with f = Cast(Unsqueeze(p)) · inv_freq (+ q if given)."""
    c = lambda name, v: numpy_helper.from_array(np.array(v), name)  # noqa: E731
    inits = [c("inv", np.array([1.0, 0.01], np.float32)), c("ax2", np.array([2], np.int64)),
             c("ax1", np.array([1], np.int64)), c("s0", np.array([0], np.int64)), c("h", np.array([2], np.int64)),
             c("end", np.array([2**63 - 1], np.int64)), c("last", np.array([3], np.int64)),
             c("one", np.array([1], np.int64))]
    nodes = [helper.make_node("Unsqueeze", ["p", "ax2"], ["pu"]),
             helper.make_node("Cast", ["pu"], ["pf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pf", "inv"], ["f0"])]
    if "q" in angle_inputs:
        nodes.append(helper.make_node("Add", ["f0", "q"], ["f"]))
    else:
        nodes.append(helper.make_node("Identity", ["f0"], ["f"]) if "identity" in angle_inputs
                     else helper.make_node("Mul", ["f0", "one_f"], ["f"]))
        inits.append(c("one_f", np.float32(1.0)))
    nodes += [helper.make_node("Concat", ["f", "f"], ["C"], axis=-1),
              helper.make_node("Cos", ["C"], ["cos"]), helper.make_node("Sin", ["C"], ["sin"]),
              helper.make_node("Unsqueeze", ["cos", "ax1"], ["cu"]), helper.make_node("Unsqueeze", ["sin", "ax1"], ["su"]),
              helper.make_node("Slice", ["x", "s0", "h", "last", "one"], ["x1"]),
              helper.make_node("Slice", ["x", "h", "end", "last", "one"], ["x2"]),
              helper.make_node("Neg", ["x2"], ["nx2"]), helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
              helper.make_node("Mul", ["x", "cu"], ["a"]), helper.make_node("Mul", ["rot", "su"], ["b"]),
              helper.make_node("Add", ["a", "b"], ["y"], name="rope")]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "s", 4]),
           helper.make_tensor_value_info("p", TensorProto.INT64, [1, "s"])]
    if "q" in angle_inputs:
        ins.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, "s", 2]))
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_small_graph_fused_and_equal():
    model = _rotary_graph(())
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 4)).astype(np.float32)
    feeds = {"x": x, "p": np.array([[7, 8, 9, 10, 11]], np.int64)}
    want = _sess(model).run(None, feeds)[0]
    res = run_pass(FuseRotary(64), copy.deepcopy(model))
    assert res.counts == {"fused": 1, "tables": 1}
    out = run_pass(Cleanup(), res.model).model
    assert [n.op_type for n in out.graph.node] == ["RotaryEmbedding"]
    np.testing.assert_allclose(_sess(out).run(None, feeds)[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["q", "identity"])
def test_angles_not_tabulable_left_alone(variant):
    # q: the angles depend on a second graph input; identity: an op outside the per-position set
    model = _rotary_graph((variant,))
    res = run_pass(FuseRotary(64), copy.deepcopy(model))
    assert not res.modified and res.counts["fused"] == 0
    assert len(res.notes) == 1 and "left as exported" in res.notes[0]
    assert _ops(res.model) == _ops(model)


def test_cli_default_and_no_contrib_ops(tiny_dirs, tmp_path, capsys):
    from tests.helpers import run_cli

    for flags, want in (((), ["GroupQueryAttention", "SkipSimplifiedLayerNormalization"]), (("--no-contrib-ops",), [])):
        out = tmp_path / ("out" + "".join(flags))
        code, _, err = run_cli(capsys, "export", tiny_dirs("llama"), "--method", "rtn", "--bits", "4",
                               "--group-size", "16", *flags, "-o", out, "-q")
        assert code == 0, err
        cfg = json.loads((out / "quant_config.json").read_text())
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        assert cfg["contrib_ops"] == want
        assert sorted({n.op_type for n in graph.node if n.domain == MS}) == want
        assert cfg["validation"]["max_abs_logit_diff"] <= cfg["validation"]["limit"]
