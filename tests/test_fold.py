"""AffineQuant transforms: the fold math, the export with explicit transform nodes, and the fold passes.

Tiny random LLaMA (GQA: 4 query heads, 2 KV heads) and OPT (LayerNorm with biases, shifts). Each fold pass must leave
ONNX Runtime outputs unchanged (`verify_each` with feeds), the folded graph must hold exactly the weights the PyTorch
merge computes with the same functions, and no transform node may be left except the `--ln-matrix` MatMul.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from tests.helpers import VOCAB, tiny_model
from qcompiler.graph import fold
from qcompiler.graph.export import KVLayout, export_model
from qcompiler.models.families import family_for, get_module
from qcompiler.passes import Cleanup, FoldAffineIntoLinear, FoldAffineIntoNorm, PassContext, PassError, PassManager
from qcompiler.quantize.transforms import AffineTransforms, identity_transforms


# ------------------------------------------------------------------------------------------------ fold math
def test_fold_into_norm_and_linear_equal_the_transformed_computation():
    g = torch.Generator().manual_seed(0)
    K, N = 8, 5
    x = torch.randn(3, K, generator=g, dtype=torch.float64)
    w, b = torch.rand(K, generator=g) + 0.5, torch.randn(K, generator=g)
    s, delta = torch.rand(K, generator=g) + 0.5, torch.randn(K, generator=g)
    W, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    y = x * w + b  # a norm's affine part
    ref = (y @ W.double()) + bias  # the linear on the untransformed output
    nw, nb, left = fold.fold_into_norm(w, b, 1 / s, -delta)
    assert left is None
    W2, b2 = fold.fold_linear_input(W, bias, s, post=delta)
    got = (x * nw.double() + nb.double()) @ W2.double() + b2.double()
    assert torch.allclose(got, ref, atol=1e-5)
    # a norm without bias: the shift comes back as `leftover`, folded into the linear
    nw, nb, left = fold.fold_into_norm(w, None, 1 / s, -delta)
    assert nb is None and left is not None
    W3, b3 = fold.fold_linear_input(W, bias, s, pre=left, post=delta)
    got = (x * nw.double()) @ W3.double() + b3.double()
    assert torch.allclose(got, x * w @ W.double() + bias, atol=1e-5)


def test_fold_into_a_norm_with_a_weight_offset():
    """Gemma's RMSNorm scales by `1 + w`: the folded weight `w'` gives `1 + w' = (1 + w) ⊙ P` (a fold that scaled the
    stored `w` would give `1 + w ⊙ P`)."""
    g = torch.Generator().manual_seed(2)
    K = 8
    w, s = torch.randn(K, generator=g), torch.rand(K, generator=g) + 0.5
    nw, nb, left = fold.fold_into_norm(w, None, 1 / s, offset=1.0)
    assert nb is None and left is None
    assert torch.allclose(1 + nw.double(), (1 + w.double()) / s.double(), atol=1e-6)
    assert not torch.allclose(1 + nw.double(), 1 + w.double() / s.double(), atol=1e-3)


def test_fold_linear_output_and_heads():
    g = torch.Generator().manual_seed(1)
    A = torch.eye(4) + 0.1 * torch.randn(2, 4, 4, generator=g)
    B = fold.block_diag_heads(fold.blocks_inverse64(A))
    Arep = fold.block_diag_heads(A, repeat=2)
    assert B.shape == (8, 8) and Arep.shape == (16, 16)
    # query head h reads KV head h // 2: blocks 0, 0, 1, 1
    assert torch.equal(Arep[4:8, 4:8], A[0]) and torch.equal(Arep[8:12, 8:12], A[1])
    W, b = torch.randn(6, 8, generator=g), torch.randn(8, generator=g)
    W2, b2 = fold.fold_linear_output(W, b, B)
    x = torch.randn(2, 6, generator=g)
    assert torch.allclose((x @ W2 + b2) @ fold.block_diag_heads(A), x @ W + b, atol=1e-5)


def test_strict_diagonal_dominance_check():
    assert fold.is_strictly_diagonally_dominant(torch.tensor([[2.0, 1.0], [0.5, -1.0]]))
    assert not fold.is_strictly_diagonally_dominant(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


# ------------------------------------------------------------------------------------------------ graph passes
def random_transforms(model, *, matrix: bool, shift: bool, seed: int = 0) -> AffineTransforms:
    g = torch.Generator().manual_seed(seed)
    t = identity_transforms(model, family_for(model), matrix=matrix, shift=shift)
    for n in t.norms:
        K = n.A.shape[0]
        d = torch.exp(0.3 * torch.randn(K, generator=g))
        n.A = torch.diag(d) + 0.02 * torch.randn(K, K, generator=g) if matrix else d
        if shift:
            n.shift = 0.1 * torch.randn(K, generator=g)
    for h in t.heads:
        H, d, _ = h.blocks.shape
        h.blocks = torch.eye(d).repeat(H, 1, 1) + 0.05 * torch.randn(H, d, d, generator=g)
    return t


def feeds(layout: KVLayout, seq: int = 7, past: int = 2) -> dict:
    rng = np.random.default_rng(0)
    out = {
        "input_ids": rng.integers(0, VOCAB, size=(2, seq)).astype(np.int64),
        "attention_mask": np.ones((2, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (2, 1)),
    }
    for name in layout.input_names():
        out[name] = rng.standard_normal((2, layout.num_kv_heads, past, layout.head_dim)).astype(np.float32)
    return out


CASES = [("llama", False, False), ("opt", False, True), ("llama", True, False), ("opt", True, True),
         ("llama", False, True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'matrix' if c[1] else 'diag'}"
                f"{'-shift' if c[2] else ''}")
def folded(request):
    kind, matrix, shift = request.param
    model = tiny_model(kind)
    t = random_transforms(model, matrix=matrix, shift=shift)
    fp = copy.deepcopy(model)
    handles = t.install(fp)
    exported = export_model(fp, transforms=t.manifest())
    for h in handles:
        h.remove()
    layout = KVLayout.from_config(model.config)
    unfolded = onnx.ModelProto()
    unfolded.CopyFrom(exported.model)
    ctx = PassContext(verify_each=True, verify_feeds=feeds(layout))
    run = PassManager([FoldAffineIntoNorm(exported.manifest), FoldAffineIntoLinear(exported.manifest), Cleanup()],
                      context=ctx).run(exported.model)
    return dict(kind=kind, matrix=matrix, shift=shift, model=model, t=t, run=run, manifest=exported.manifest,
                unfolded=unfolded, layout=layout)


def _ort(proto, f):
    from qcompiler.runtime.ops import session

    return session(proto.SerializeToString()).run(["logits"], f)[0]


def test_unfolded_graph_is_the_full_precision_model(folded):
    # without past: the value cache of a transformed model holds v·A⁻¹, so a random past is not comparable
    f = feeds(folded["layout"], past=0)
    past = tuple(torch.from_numpy(f[n]) for n in folded["layout"].input_names())
    from qcompiler.graph.export import KVCacheWrapper

    with torch.no_grad():
        ref = KVCacheWrapper(folded["model"], folded["layout"])(
            *(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask", "position_ids")), *past)[0]
    got = _ort(folded["unfolded"], f)
    assert np.max(np.abs(got - ref.numpy())) < 1e-4
    names = [n.name for n in folded["unfolded"].graph.node if "/affine/" in n.name]
    per_norm = 2 + 2 * folded["shift"]
    assert len(names) == len(folded["t"].norms) * per_norm + 2 * len(folded["t"].heads)


def test_fold_passes_keep_outputs_and_leave_no_transform_nodes(folded):
    # verify_each already compared ORT outputs before/after each pass (≤ 1e-4); check structure and counts
    steps = {name: res for name, res, _ in folded["run"].steps}
    assert steps["fold-affine-into-norm"].counts["folded"] == len(folded["t"].norms)
    assert steps["fold-affine-into-linear"].counts["head_transforms"] == len(folded["t"].heads)
    left = [n.name for n in folded["run"].model.graph.node if "/affine/" in n.name]
    if folded["matrix"]:
        kept = [n for n in left if n.endswith("/affine/matrix")]
        assert len(kept) == len(folded["t"].norms)
        # LayerNorm holds the shift in its bias; RMSNorm keeps an Add in front of the matrix
        shifts = [n for n in left if n.endswith("/affine/shift")]
        assert len(shifts) == (len(folded["t"].norms) if folded["shift"] and folded["kind"] == "llama" else 0)
        assert len(left) == len(kept) + len(shifts)
    else:
        assert left == []
    ops = {n.op_type for n in folded["run"].model.graph.node}
    assert "MatMul" in ops


def test_folded_weights_equal_the_pytorch_merge(folded):
    model, t = folded["model"], folded["t"]
    merged = t.merged_weights(model)
    inits = {i.name: numpy_helper.to_array(i) for i in folded["run"].model.graph.initializer}
    lin = folded["manifest"]["linears"]
    assert set(merged) <= set(lin)
    for module, (W, b) in merged.items():
        graph_w = inits[lin[module]["weight"]]
        graph_w = graph_w if lin[module]["weight_layout"] == "NxK" else graph_w.T
        assert np.array_equal(graph_w, W.numpy()), module
        if b is not None:
            assert lin[module]["bias"] is not None
            assert np.array_equal(inits[lin[module]["bias"]], b.numpy()), module


def test_merged_pytorch_model_matches_folded_graph(folded):
    """The PyTorch merge (norms folded in place, transformed weights loaded) computes what the folded graph does."""
    model = copy.deepcopy(folded["model"])
    t = folded["t"]
    merged = t.merged_weights(model)
    handles = t.merge_norms(model)
    with torch.no_grad():
        for module, (W, b) in merged.items():
            lin = get_module(model, module)
            lin.weight.copy_(W)
            if b is not None:
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(b.clone())
                else:
                    lin.bias.copy_(b)
    f = feeds(folded["layout"])
    from qcompiler.graph.export import KVCacheWrapper

    past = tuple(torch.from_numpy(f[n]) for n in folded["layout"].input_names())
    with torch.no_grad():
        ref = KVCacheWrapper(model, folded["layout"])(
            *(torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask", "position_ids")), *past)[0]
    for h in handles:
        h.remove()
    assert np.max(np.abs(_ort(folded["run"].model, f) - ref.numpy())) < 1e-4


def test_verify_each_catches_a_pass_that_moves_outputs():
    model = tiny_model("llama")
    t = random_transforms(model, matrix=False, shift=False)
    handles = t.install(model)
    exported = export_model(model, transforms=t.manifest())
    for h in handles:
        h.remove()

    class Broken(FoldAffineIntoNorm):
        def call(self, m):
            res = super().call(m)
            w = next(v for name, v in m.graph.initializers.items() if name.endswith("input_layernorm.weight"))
            w.const_value = ir.tensor(w.const_value.numpy() * 1.5, name=w.name)
            return res

    ctx = PassContext(verify_each=True, verify_feeds=feeds(KVLayout.from_config(model.config)))
    with pytest.raises(PassError, match="moved by"):
        PassManager([Broken(exported.manifest)], context=ctx).run(exported.model)


def test_fold_linear_requires_fold_norm_first():
    model = tiny_model("llama")
    t = random_transforms(model, matrix=False, shift=False)
    handles = t.install(model)
    exported = export_model(model, transforms=t.manifest())
    for h in handles:
        h.remove()
    with pytest.raises(PassError, match="fold-affine-into-norm first"):
        PassManager([FoldAffineIntoLinear(exported.manifest)]).run(exported.model)
