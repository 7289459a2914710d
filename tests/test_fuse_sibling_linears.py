"""fuse-sibling-linears (SpQRMatMuls reading one input → one SpQRMatMul + Split) and pack-qkv (GroupQueryAttention
reads the fused q/k/v unsplit): `SpQRWeight.concat` / `split` are exact inverses, the fused graph computes the same
outputs in ONNX Runtime, and a tiny SpQR export runs q/k/v and gate/up as one node each, its prefill + decode steps
equal to the PyTorch model read back from the folder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.graph.format import SpQRWeight
from tests.builders import random_weight

FIELDS = ("qweight", "scales", "zeros", "stats2", "outlier_row_ptr", "outlier_col_idx", "outlier_values", "perm",
          "bias")


def _siblings(stat_bits: int, *, perms=(0, 0, 0), sizes=(48, 16, 32), bias=True) -> list[SpQRWeight]:
    out = []
    for i, (n, p) in enumerate(zip(sizes, perms)):
        w = random_weight(N=n, K=40, bits=3, group_size=8, stat_bits=stat_bits, stat_group_size=16,
                          outlier_rate=0.05 if i != 1 else 0.0, permute=True, bias=bias, seed=i)
        w.perm = np.random.default_rng(100 + p).permutation(40).astype(np.int32)
        out.append(w)
    return out


@pytest.mark.parametrize("stat_bits", [0, 3])
def test_concat_is_the_rows_of_its_parts_and_split_gives_them_back(stat_bits):
    parts = _siblings(stat_bits)
    fused = SpQRWeight.concat(parts)
    assert fused.N == 96 and fused.nnz == sum(p.nnz for p in parts) > 0
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    np.testing.assert_allclose(fused.matmul(x), np.concatenate([p.matmul(x) for p in parts], axis=-1),
                               rtol=1e-6, atol=1e-6)
    for back, part in zip(fused.split([p.N for p in parts]), parts):
        for field in FIELDS:
            a, b = getattr(back, field), getattr(part, field)
            assert (a is None) == (b is None), field
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=field)


def test_concat_refuses_what_one_node_cannot_hold():
    assert "permutations differ" in SpQRWeight.concat_refusal(_siblings(3, perms=(0, 1, 0)))
    assert "stat_group_size" in SpQRWeight.concat_refusal(_siblings(3, sizes=(40, 16, 32)))
    assert SpQRWeight.concat_refusal(_siblings(0, sizes=(40, 16, 32))) is None  # fp16 statistics: any split
    mixed = _siblings(3)
    mixed[1].bias = None
    assert "bias" in SpQRWeight.concat_refusal(mixed)
    with pytest.raises(ValueError, match="permutations differ"):
        SpQRWeight.concat(_siblings(3, perms=(0, 1, 0)))


def _three_linears(weights: list[SpQRWeight]) -> onnx.ModelProto:
    from qcompiler.graph.format import DOMAIN, OPSET_VERSION
    from qcompiler.graph.onnx_op import spqr_node

    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        node, tensors = spqr_node(w, x="X", y=f"Y{i}", prefix=f"block.lin{i}")
        nodes.append(node)
        inits += tensors
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["m", w.N]))
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", 40])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN,
                                                                                                     OPSET_VERSION)],
                             ir_version=10)


def test_pass_fuses_siblings_with_the_same_outputs_and_skips_others():
    from qcompiler.graph.onnx_op import node_parts, weights_from_node
    from qcompiler.passes import FuseSiblingLinears, run_pass
    from qcompiler.runtime.ops import session

    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    model = _three_linears(_siblings(3))
    before = session(model.SerializeToString()).run(None, {"X": x})
    result = run_pass(FuseSiblingLinears(), model, ensures=True)
    assert result.counts == {"fused": 3}
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["SpQRMatMul", "Split"]
    (fused,) = [n for n in result.model.graph.node if n.op_type == "SpQRMatMul"]
    assert fused.name == "block.lin0+lin1+lin2/SpQRMatMul"
    assert node_parts(fused) == [("block.lin0", 48), ("block.lin1", 16), ("block.lin2", 32)]
    inits = {t.name: t for t in result.model.graph.initializer}
    assert [m for m, _ in weights_from_node(fused, inits)] == ["block.lin0", "block.lin1", "block.lin2"]
    after = session(result.model.SerializeToString()).run(None, {"X": x})
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    skipped = run_pass(FuseSiblingLinears(), _three_linears(_siblings(3, perms=(0, 1, 2))))
    assert skipped.counts == {"fused": 0} and "permutations differ" in skipped.notes[0]


def test_spqr_export_runs_qkv_and_gate_up_as_one_node_each(tiny_export, text_file):
    """Every layer: q/k/v one SpQRMatMul read whole by GroupQueryAttention (packed QKV), gate/up one with its SwiGLU; prefill
    and single-token steps over the shared KV buffer equal the folder's PyTorch model (torch_model_from_folder
    splits the fused nodes back)."""
    import torch

    from qcompiler.graph.onnx_op import node_parts
    from qcompiler.runtime.evaluate import torch_model_from_folder
    from tests.test_gqa import PROMPT, STEPS, _stepped_logits

    folder = tiny_export("llama", "spqr", "--preset", "sub4", "--accuracy-level", "0", "--nsamples", "4", "--seqlen",
                         "32", "--calibration", str(text_file))
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    spqr = [n for n in graph.node if n.op_type == "SpQRMatMul"]
    assert [n.name for n in spqr[:4]] == ["model.layers.0.self_attn.q_proj+k_proj+v_proj/SpQRMatMul",
                                          "model.layers.0.self_attn.o_proj/SpQRMatMul",
                                          "model.layers.0.mlp.gate_proj+up_proj/SpQRMatMul",
                                          "model.layers.0.mlp.down_proj/SpQRMatMul"]
    assert sum(len(node_parts(n)) for n in spqr) == 14  # 7 linears × 2 layers
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(list(n.input[1:3]) == ["", ""] for n in attention)  # packed q/k/v
    producers = {o: n for n in graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "SpQRMatMul" for n in attention)
    # gate/up: one node per layer that applies silu(gate) · up itself (fuse-silu-mul), read by down_proj
    gate_up = [n for n in spqr if n.name.endswith("gate_proj+up_proj/SpQRMatMul")]
    assert len(gate_up) == 2 and all({a.name: a.s for a in n.attribute}.get("activation") == b"silu_mul"
                                     for n in gate_up)
    assert not any(n.op_type in ("Split", "Sigmoid") for n in graph.node)
    down = [n for n in spqr if n.name.endswith("down_proj/SpQRMatMul")]
    assert [producers[n.input[0]].name for n in down] == [n.name for n in gate_up]
    model, _ = torch_model_from_folder(folder)
    ids = np.random.default_rng(5).integers(3, 120, size=(1, PROMPT + STEPS))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    got = _stepped_logits(folder, ids, shared=True)
    assert np.abs(got - ref).max() <= 1e-5 + 1e-5 * np.abs(ref).max()


def test_qk_norm_family_keeps_the_split_before_its_norms(tiny_export, text_file):
    """Qwen3 normalises q and k per head before the attention: q/k/v are still one SpQRMatMul, split for the
    norms, and the attention reads q, k and v separately."""
    folder = tiny_export("qwen3", "spqr", "--preset", "sub4", "--nsamples", "4", "--seqlen", "32", "--calibration",
                         str(text_file))
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert any(n.name.endswith("q_proj+k_proj+v_proj/SpQRMatMul") for n in graph.node)
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.input[1] and n.input[2] for n in attention)
