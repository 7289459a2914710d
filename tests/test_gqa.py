"""Fused attention (qcompiler/graph/gqa.py, passes/fuse_attention_rotary.py): every decoder type's default export runs
its attention as com.microsoft::GroupQueryAttention, and through ONNX Runtime a prefill plus single-token steps over
one shared KV buffer (what `qcompiler generate` and onnxruntime-genai do) give the logits of transformers' own full
forward; the standard-op graph (`--no-contrib-ops`) gives the same logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.test_architectures import ALL_KINDS

PROMPT, STEPS = 12, 8


def _stepped_logits(folder, ids: np.ndarray, *, shared: bool) -> np.ndarray:
    from qcompiler.runtime.generate import Generator, _Concatenated, _SharedBuffer

    gen = Generator(folder)
    step = _SharedBuffer(gen, ids.shape[1]) if shared else _Concatenated(gen)
    logits = [step(ids[:, :PROMPT], 0)]
    for pos in range(PROMPT, ids.shape[1]):
        logits.append(step(ids[:, pos:pos + 1], pos).copy())  # _SharedBuffer: the next step overwrites them
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_prefill_and_steps_over_a_shared_buffer_equal_a_full_forward(kind, tiny_export):
    from tests.helpers import tiny_model

    folder = tiny_export(kind, "none")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    layers = tiny_model(kind).config.num_hidden_layers
    assert sum(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in graph.node) == layers
    ids = np.random.default_rng(3).integers(3, 120, size=(1, PROMPT + STEPS))
    with torch.no_grad():
        ref = tiny_model(kind)(torch.from_numpy(ids)).logits.numpy()
    shared = _stepped_logits(folder, ids, shared=True)
    scale = np.abs(ref).max()
    assert np.abs(shared - ref).max() <= 1e-5 + 1e-5 * scale, kind
    # the same graph with presents fed back (no shared buffer) computes the same
    assert np.abs(_stepped_logits(folder, ids, shared=False) - shared).max() <= 1e-5 + 1e-5 * scale


@pytest.mark.parametrize("kind", ["llama", "gemma2", "mistral-swa"])
def test_standard_op_graph_gives_the_same_logits(kind, tiny_export):
    fused, standard = tiny_export(kind, "none"), tiny_export(kind, "none", "--no-contrib-ops")
    graph = onnx.load(str(standard / "model.onnx"), load_external_data=False).graph
    assert not any(n.domain == "com.microsoft" for n in graph.node)
    ids = np.random.default_rng(4).integers(3, 120, size=(1, PROMPT + STEPS))
    a = _stepped_logits(fused, ids, shared=True)
    b = _stepped_logits(standard, ids, shared=False)
    assert np.abs(a - b).max() <= 1e-5 + 1e-5 * np.abs(b).max()


def test_attention_function_is_only_active_during_the_export():
    """The export switches the model's attention implementation for the trace only (the PyTorch model stays the
    validation reference)."""
    from qcompiler.graph.export import export_model
    from tests.helpers import tiny_model

    model = tiny_model("llama")
    before = model.config._attn_implementation
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        ref = model(ids).logits
    exported = export_model(model, fused_attention=True)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    ops = [n.op_type for n in exported.model.graph.node]
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers


def test_generate_describes_its_cache(tiny_export):
    from qcompiler.runtime.generate import Generator

    assert "shared" in Generator(tiny_export("llama", "none")).describe()
    assert "concatenated" in Generator(tiny_export("llama", "none", "--no-contrib-ops")).describe()
