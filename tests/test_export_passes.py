"""Export (KV cache) + pass pipeline on tiny random LLaMA (GQA) and OPT: structure and numbers through ORT."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from tests.helpers import tiny_model
from qcompiler.graph.export import KVLayout, export_model
from qcompiler.graph.format import DOMAIN, OP_TYPE
from tests.builders import random_weight
from qcompiler.passes import Cleanup, Pass, PassContext, PassError, PassManager, PassResult, ReplaceLinear

# (bits, group_size, stat_bits, outlier_rate, permute) cycled over the layers so every feature is exercised.
VARIANTS = [(4, 16, 0, 0.0, False), (3, 32, 3, 0.01, True), (2, 64, 0, 0.02, False), (4, 128, 2, 0.0, True),
            (3, 8, 4, 0.005, False)]


def _quantize_randomly(model, family_linears):
    """Give each linear a random SpQR-format weight and load its decoded value into the model (fake-quant)."""
    layers = {}
    modules = dict(model.named_modules())
    for i, name in enumerate(family_linears):
        lin = modules[name]
        bits, gs, sb, rate, perm = VARIANTS[i % len(VARIANTS)]
        w = random_weight(N=lin.out_features, K=lin.in_features, bits=bits, group_size=gs, stat_bits=sb,
                          stat_group_size=16, outlier_rate=rate, permute=perm, seed=i)
        if lin.bias is not None:
            w = dataclasses.replace(w, bias=lin.bias.detach().numpy().astype(np.float32))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.dequantize()))
        layers[name] = w
    return layers


def _decoder_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]


@pytest.fixture(scope="module", params=["llama", "opt", "llama3", "qwen3", "mistral-swa", "qwen2-swa", "phi3", "gemma2",
                                               "gemma3_text", "smollm3", "granite"])
def compiled(request, tmp_path_factory):
    model = tiny_model(request.param)
    layers = _quantize_randomly(model, _decoder_linears(model))
    exported = export_model(model)
    n_add_before = sum(n.op_type == "Add" for n in exported.model.graph.node)
    dump = tmp_path_factory.mktemp("dump")
    ctx = PassContext(verify_each=True, dump_dir=str(dump))
    run = PassManager([ReplaceLinear(layers, exported.manifest), Cleanup()], context=ctx).run(exported.model)
    return dict(kind=request.param, model=model, layers=layers, run=run, manifest=exported.manifest,
                n_add_before=n_add_before, dump=dump)


def _session(proto):
    from qcompiler.runtime.ops import session

    return session(proto.SerializeToString())


def _feeds(layout, ids, past_len=0, past=None):
    b, s = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, past_len + s), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).astype(np.int64),
    }
    feeds.update(past if past is not None else layout.empty_past(b))
    return feeds


def test_structure(compiled):
    g = compiled["run"].model.graph
    spqr = [n for n in g.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    assert len(spqr) == len(compiled["layers"])
    assert {n.name for n in spqr} == {f"{m}/{OP_TYPE}" for m in compiled["layers"]}
    weights = {compiled["manifest"]["linears"][m]["weight"] for m in compiled["layers"]}
    inits = {t.name for t in g.initializer}
    assert not weights & inits, "fp32 weights of quantized layers must be gone"
    assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in weights for n in g.node)
    steps = {name: res for name, res, _ in compiled["run"].steps}
    assert steps["replace-linear"].counts["replaced"] == len(compiled["layers"])
    n_bias = sum(w.bias is not None for w in compiled["layers"].values())
    if compiled["kind"] == "opt":
        assert n_bias == len(compiled["layers"])
        n_gemm_bias = sum(compiled["manifest"]["linears"][m]["op"] == "Gemm" for m in compiled["layers"])
        assert steps["replace-linear"].counts["bias_folded"] == n_bias
        # each MatMul+Add linear lost its Add; Gemm linears had their bias inside the Gemm
        n_add_after = sum(n.op_type == "Add" for n in g.node)
        assert compiled["n_add_before"] - n_add_after == n_bias - n_gemm_bias
    else:  # Qwen2's q/k/v carry biases; the other decoder-only families none
        assert n_bias == (3 * 2 if compiled["kind"].startswith("qwen2") else 0)
    assert [p.name for p in sorted(compiled["dump"].iterdir()) if p.suffix == ".onnx"] == [
        "01_replace-linear.onnx", "02_cleanup.onnx"]


def test_logits_match_pytorch(compiled):
    model = compiled["model"]
    layout = KVLayout.from_config(model.config)
    sess = _session(compiled["run"].model)
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 12))
    got = sess.run(["logits"], _feeds(layout, ids))[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-3


def test_kv_cache_prefill_then_decode(compiled):
    model = compiled["model"]
    layout = KVLayout.from_config(model.config)
    sess = _session(compiled["run"].model)
    names = [o.name for o in sess.get_outputs()]
    ids = np.random.default_rng(2).integers(0, 128, size=(1, 10))
    full = sess.run(["logits"], _feeds(layout, ids))[0]
    out = sess.run(None, _feeds(layout, ids[:, :7]))
    steps = [out[0]]
    for t in range(7, 10):
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        assert past["past_key_values.0.key"].shape == (1, layout.num_kv_heads, t, layout.head_dim)
        out = sess.run(None, _feeds(layout, ids[:, t:t + 1], past_len=t, past=past))
        steps.append(out[0])
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4


def test_replace_linear_rejects_weight_mismatch():
    model = tiny_model("llama")
    names = _decoder_linears(model)[:2]
    layers = _quantize_randomly(model, names)
    exported = export_model(model)
    w = layers[names[0]]
    layers[names[0]] = dataclasses.replace(w, qweight=np.ascontiguousarray(255 - w.qweight))
    with pytest.raises(PassError, match=r"replace-linear.*differs from the quantizer's evaluated weight"):
        PassManager([ReplaceLinear(layers, exported.manifest)]).run(exported.model)


class _BreakGraph(Pass):
    """Deliberately drops the first node so the next verification fails."""

    name = "break-graph"

    def call(self, model):
        model.graph.remove(model.graph[0])  # (an ir.Model: its readers now read a value nothing produces)
        return PassResult(model=model, modified=True)


def test_verify_each_names_failing_pass_and_history():
    model = tiny_model("llama")
    exported = export_model(model)
    manager = PassManager([Cleanup(), _BreakGraph()], context=PassContext(verify_each=True))
    with pytest.raises(PassError, match=r"pass 'break-graph' failed \(after \['cleanup'\]\)"):
        manager.run(exported.model)


def test_cleanup_removes_dead_nodes_and_initializers():
    model = tiny_model("llama")
    proto = export_model(model).model
    extra = onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused_const")
    proto.graph.initializer.append(extra)
    proto.graph.node.append(onnx.helper.make_node("Relu", [proto.graph.input[0].name], ["dead_out"], name="dead"))
    res = PassManager([Cleanup()], context=PassContext(verify_each=True)).run(proto).steps[0][1]
    assert res.counts["dead_nodes"] == 1
    assert res.counts["unused_initializers"] >= 1
    assert "unused_const" not in res.model.graph.initializers  # (steps hold the ir.Model)
    assert "dead" not in {n.name for n in res.model.graph}
