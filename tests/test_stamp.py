"""Per-layer graph construction (qcompiler/graph/stamp.py): the stamped graph computes what a full trace computes,
on every layer layout the families have; the template is undone; anything unusual falls back to the full trace."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tests.helpers import tiny_config

from qcompiler.graph import stamp as S
from qcompiler.graph.export import KVLayout, export_model


COMPUTE = {"MatMul", "Gemm", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "GroupQueryAttention", "Sigmoid",
           "Neg", "Tanh", "Erf", "Relu", "LayerNormalization", "Sin", "Cos"}


def _model(kind: str, layers: int = 3):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind)
    cfg.num_hidden_layers = layers
    for key in ("layer_types", "no_rope_layers"):  # per-layer lists follow the layer count
        if getattr(cfg, key, None):
            setattr(cfg, key, (list(getattr(cfg, key)) * layers)[:layers])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # distinct norm weights per layer: a stamped copy must carry its own
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    return model


def _run(result, model, *, batch: int):
    layout = KVLayout.from_config(model.config)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 100, (batch, 5)), "attention_mask": np.ones((batch, 8), np.int64),
             "position_ids": np.tile(np.arange(3, 8), (batch, 1))}
    for name in layout.input_names():
        feeds[name] = rng.standard_normal((batch, layout.num_kv_heads, 3, layout.head_dim)).astype(np.float32)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("kind, fused", [("llama", False), ("llama", True), ("qwen3", True), ("gemma3_text", True),
                                         ("phi3", True), ("opt", False), ("smollm3", True), ("qwen2-swa", True)])
def test_stamped_graph_equals_the_full_trace(kind, fused):
    model = _model(kind)
    plan = S.plan_for(model)
    assert plan is not None and len(plan.templates) < 3
    stamped = export_model(model, fused_attention=fused, per_layer=True)
    traced = export_model(model, fused_attention=fused, per_layer=False)
    assert not any(n.domain == S.DOMAIN for n in stamped.model.graph.node)
    assert {o.domain for o in stamped.model.opset_import} == {o.domain for o in traced.model.opset_import}
    assert [i.name for i in stamped.model.graph.input] == [i.name for i in traced.model.graph.input]
    assert [o.name for o in stamped.model.graph.output] == [o.name for o in traced.model.graph.output]
    assert stamped.manifest["linears"].keys() == traced.manifest["linears"].keys()
    # the same compute per layer (the shape plumbing differs: a full trace reads each layer's dims from its own past)
    ops = [collections.Counter(n.op_type for n in r.model.graph.node if n.op_type in COMPUTE)
           for r in (stamped, traced)]
    assert ops[0] == ops[1] and ops[0]["MatMul"] + ops[0]["Gemm"] >= 3 * 4
    # every layer's nodes carry that layer's module path (what the manifest and Netron read)
    for i in range(3):
        assert any(f"{plan.layers_path}.{i}." in p.value for n in stamped.model.graph.node
                   for p in n.metadata_props if p.key == "namespace")
    for a, b in zip(_run(stamped, model, batch=1 if fused else 2), _run(traced, model, batch=1 if fused else 2)):
        np.testing.assert_array_equal(a, b)


def test_plans():
    llama = _model("llama", layers=4)
    plan = S.plan_for(llama)
    assert plan.templates == (0,) and plan.kind_of == (0, 0, 0, 0) and plan.layers_path == "model.layers"
    gemma = _model("gemma3_text", layers=4)  # sliding, full, sliding, full
    assert S.plan_for(gemma).kind_of == (0, 1, 0, 1) and S.plan_for(gemma).templates == (0, 1)
    assert S.plan_for(_model("gemma3_text", layers=2)) is None  # every layer its own kind: nothing to save


def test_template_is_undone():
    model = _model("gemma3_text", layers=4)
    plan = S.plan_for(model)
    layers = model.model.layers
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    idx = [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")]
    types = list(model.config.layer_types)
    with S.template(model, plan) as traced:
        assert traced.layers == 2 and len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
        assert model.config.layer_types == [types[0], types[1]]
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, values["model.layers.0.mlp.up_proj.weight"])
    assert model.model.layers is layers and model.config.num_hidden_layers == 4 and model.config.layer_types == types
    assert [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")] == idx
    for n, p in model.named_parameters():
        assert p is params[n] and torch.equal(p, values[n]), n
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)


def test_cannot_stamp_falls_back_to_the_full_trace(monkeypatch, caplog):
    model = _model("llama")

    def refuse(*_args, **_kwargs):
        raise S.CannotStamp("injected")

    monkeypatch.setattr(S, "stamp", refuse)
    with caplog.at_level("INFO", logger="qcompiler.graph.export"):
        result = export_model(model, per_layer=True)
    assert "injected" in caplog.text and "tracing the whole model" in caplog.text
    assert len(result.manifest["linears"]) == 3 * 7 + 1
    assert not any(n.domain == S.DOMAIN for n in result.model.graph.node)


def test_match_finds_the_exporters_transforms():
    rng = np.random.default_rng(0)
    w, n = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    params = {"w": w, "n": n}
    assert S._match(w.T.copy(), params) == S._Weight("w", transpose=True)
    one_plus = (np.float32(1.0) + n).reshape(1, 4)
    found = S._match(one_plus, params)
    assert found.param == "n" and found.offset == 1.0 and found.shape == (1, 4)
    np.testing.assert_array_equal(found.make(n), one_plus)
    assert S._match(rng.standard_normal(4).astype(np.float32), params) is None
