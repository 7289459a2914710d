"""AffineQuant on tiny random LLaMA (GQA) and OPT: gradual mask, diagonal dominance, LWC, end-to-end export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import tiny_model
from qcompiler import QCompilerError
from qcompiler.graph import fold
from qcompiler.models.families import family_for
from qcompiler.quantize.methods.affinequant import (
    AffineQuant,
    AffineQuantConfig,
    _LayerState,
    band_at,
    band_mask,
    lwc_fake_quant,
    make_dominant_,
)


def _calib(n=3, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seqlen), generator=g) for _ in range(n)]


def test_band_schedule_starts_diagonal_and_ends_full():
    assert [band_at(9, e, 5) for e in range(5)] == [1, 3, 5, 7, 9]
    m = band_mask(4, 2, 0.1)
    assert torch.equal(m, torch.tensor([[1, .1, 0, 0], [.1, 1, .1, 0], [0, .1, 1, .1], [0, 0, .1, 1]]).float())
    assert torch.equal(band_mask(3, 1, 0.5), torch.eye(3))


def test_make_dominant_restores_strict_dominance():
    A = torch.tensor([[1.0, 2.0, -3.0], [0.001, 1.0, 0.0], [5.0, 5.0, 0.5]])
    mask = torch.ones(3, 3)
    assert not fold.is_strictly_diagonally_dominant(A)
    make_dominant_(A, mask)
    assert fold.is_strictly_diagonally_dominant(A * mask)
    assert A[1, 1] == 1.0 and A[1, 0] == 0.001  # dominant rows are untouched


def test_lwc_fake_quant_grid_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 40)
    up = torch.full((4, 3), 4.0, requires_grad=True)  # groups of 16: ragged last group of 8
    low = torch.full((4, 3), 4.0, requires_grad=True)
    q = lwc_fake_quant(w, up, low, 3, 16)
    for g0 in range(0, 40, 16):
        vals = q[:, g0:g0 + 16]
        assert all(len(torch.unique(r)) <= 8 for r in vals)
    ((q - w) ** 2).sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,ln_matrix", [("llama", True), ("opt", True), ("llama", False)])
def test_transforms_stay_strictly_diagonally_dominant_during_training(kind, ln_matrix, monkeypatch):
    checked = []
    original = _LayerState.enforce

    def enforce_and_check(self):
        original(self)
        norms, heads = self.masked()
        for A in norms:
            if A.dim() == 2:
                assert fold.is_strictly_diagonally_dominant(A)
            else:
                assert torch.all(A.abs() >= 1e-2)
        assert fold.is_strictly_diagonally_dominant(heads)
        checked.append(1)

    monkeypatch.setattr(_LayerState, "enforce", enforce_and_check)
    model = tiny_model(kind)
    # a large learning rate and sf = 1 push the off-diagonals hard
    cfg = AffineQuantConfig(bits=2, group_size=16, epochs=3, let_lr=0.2, sf=1.0, ln_matrix=ln_matrix)
    res = AffineQuant(cfg).quantize(model, family_for(model), calibration=_calib(), progress=False)
    assert len(checked) >= 2 * 3 * 3  # layers × epochs × steps
    for t in res.transforms.norms:
        assert (t.A.dim() == 2) == ln_matrix
    for h in res.transforms.heads:
        assert h.blocks.shape == (model.config.num_key_value_heads if kind == "llama" else 4, 16, 16)
        assert torch.all(torch.linalg.det(h.blocks.double()).abs() > 0)


def test_identity_init_starts_from_the_untransformed_layer():
    """init="identity": with no training the transforms are exactly identity (so the weights are LWC's grid of the
    original weights); the default SmoothQuant init is not; an unknown init is a clear error."""
    model = tiny_model("llama")
    res = AffineQuant(AffineQuantConfig(bits=3, group_size=16, epochs=0, init="identity")).quantize(
        model, family_for(model), calibration=_calib(2, 16), progress=False)
    for t in res.transforms.norms:
        assert torch.equal(t.A, torch.ones_like(t.A))
    for h in res.transforms.heads:
        assert torch.equal(h.blocks, torch.eye(h.blocks.shape[-1]).expand_as(h.blocks))
    model = tiny_model("llama")
    res = AffineQuant(AffineQuantConfig(bits=3, group_size=16, epochs=0)).quantize(
        model, family_for(model), calibration=_calib(2, 16), progress=False)
    assert not all(torch.equal(t.A, torch.ones_like(t.A)) for t in res.transforms.norms)
    with pytest.raises(QCompilerError, match="init must be one of smoothquant, identity"):
        AffineQuantConfig(init="awq")


def test_training_lowers_the_block_loss():
    """Training (from the same initial transforms and clipping) lowers the model's output error."""
    errs = {}
    for learn in (False, True):
        model = tiny_model("llama")
        ref = tiny_model("llama")
        cfg = AffineQuantConfig(bits=2, group_size=16, epochs=6 if learn else 0)
        calib = _calib(4, 32)
        AffineQuant(cfg).quantize(model, family_for(model), calibration=calib, progress=False)
        with torch.no_grad():
            errs[learn] = sum(float(((model(c).logits - ref(c).logits) ** 2).mean()) for c in calib)
    assert errs[True] < errs[False]


@pytest.mark.parametrize("kind,flags", [("llama", []), ("opt", []), ("llama", ["--ln-matrix"]),
                                        ("opt", ["--ln-matrix", "--bits", "2", "--group-size", "16"]),
                                        ("llama", ["--preset", "w4a4"])])
def test_export_end_to_end_matches_pytorch(kind, flags, tiny_dirs, tmp_path):
    _export_and_compare(kind, ["--method", "affinequant", *flags], tiny_dirs, tmp_path)


@pytest.mark.parametrize("preset,bits", [("w3a16g64-lwc", 3), ("w2a16g64-lwc", 2)])
def test_lwc_preset_learns_clipping_only(preset, bits, tiny_dirs, tmp_path):
    cfg = _export_and_compare("llama", ["--method", "affinequant", "--preset", preset, "--group-size", "16"],
                              tiny_dirs, tmp_path)
    c = cfg["config"]
    assert (c["let"], c["lwc"], c["bits"], c["batch_size"], c["aug_loss"]) == (False, True, bits, 1, True)


def test_affinequant_then_spqr_exports_spqr_layers_on_transformed_weights(tiny_dirs, tmp_path):
    cfg = _export_and_compare("llama", ["--method", "affinequant+spqr", "--bits", "3", "--outlier-threshold", "0.1"],
                              tiny_dirs, tmp_path)
    assert cfg["method"] == "affinequant+spqr" and cfg["config"]["stat_bits"] == 3
    shares = [layer["outlier_share"] for layer in cfg["layers"].values()]
    assert any(s > 0 for s in shares)  # SpQR's outliers, not AffineQuant's plain grid


def _export_and_compare(kind, flags, tiny_dirs, tmp_path):
    from qcompiler.cli import main
    from qcompiler.runtime.evaluate import evaluate_folder

    src = tiny_dirs(kind)
    calib = tmp_path / "calib.txt"
    rng = np.random.default_rng(0)
    calib.write_text(" ".join(f"w{i}" for i in rng.integers(0, 120, 4000)))
    out = tmp_path / "out"
    rc = main(["export", str(src), "--epochs", "2", "--nsamples", "3", "--seqlen", "32",
               "--calibration", str(calib), "-o", str(out), "--verify-each", "--quiet", *flags])
    assert rc == 0
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["method"] == flags[1] and cfg["validation"]["max_abs_logit_diff"] < 1e-4
    import onnx

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    left = [n.name for n in proto.graph.node if "/affine/" in n.name]
    assert all(n.endswith("/affine/matrix") for n in left)
    assert len(left) == (4 if "--ln-matrix" in flags else 0)
    if "--method" in flags and flags[1] == "affinequant":  # the size cost of what stays: 4 norms × 64² fp32
        assert cfg["affine"]["kept_bytes"] == (4 * 64 * 64 * 4 if "--ln-matrix" in flags else 0)
    act = [n for n in proto.graph.node if n.op_type.startswith("ActQuantPerToken")]
    # w4a4: one per distinct linear input: q/k/v share one, o, gate/up share one, down → 4 per layer
    assert len(act) == (4 * 2 if "w4a4" in flags else 0)
    ppl = {b: evaluate_folder(out, dataset=str(calib), seqlen=32, max_windows=3, backend=b, progress=False)
           for b in ("ort", "torch")}
    assert abs(ppl["ort"] / ppl["torch"] - 1) < 1e-4
    return cfg


def test_act_fake_quant_onnx_function_matches_pytorch_exactly():
    import onnx
    from onnx import TensorProto, helper

    from qcompiler.graph.actquant import FUNCTION_DOMAIN, act_fake_quant, act_quant_function, function_name
    from qcompiler.runtime.ops import session

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.01, 10, (3, 5, 1))).astype(np.float32)
    x[0, 0] = 0.0  # constant row: scale clamps to 1e-5
    x[1, 1, :4] = [0.5, 1.5, 2.5, -0.5]  # ties for round-half-to-even
    for bits in (4, 8):
        node = helper.make_node(function_name(bits), ["x"], ["y"], domain=FUNCTION_DOMAIN)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 64])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                        helper.make_opsetid(FUNCTION_DOMAIN, 1)],
                                  functions=[act_quant_function(bits)], ir_version=10)
        onnx.checker.check_model(model)
        got = session(model.SerializeToString()).run(["y"], {"x": x})[0]
        ref = act_fake_quant(torch.from_numpy(x), bits).numpy()
        assert np.array_equal(got, ref)
        # at most 2^bits distinct values per token
        assert max(len(np.unique(r)) for r in ref.reshape(-1, 64)) <= 2**bits


def test_lwc_grid_of_an_all_positive_group_has_a_negative_zero_and_packs_exactly():
    from qcompiler.quantize.methods.affinequant import lwc_params
    from qcompiler.quantize.methods.base import dequantize_groups, quantize_codes, to_fp16_grid, to_spqr_weight

    w = torch.linspace(1.0, 2.0, 32).reshape(2, 16)  # every group positive: the clipped range excludes 0
    up = low = torch.full((2, 1), 4.0)
    scale, zero = lwc_params(w, up, low, 3, 16)
    assert torch.all(zero < 0)
    q = lwc_fake_quant(w, up, low, 3, 16)
    assert float((q - w).abs().max()) < float(scale.max())  # the grid covers the group, nothing collapses to 0
    scale = to_fp16_grid(scale)
    codes = quantize_codes(w, scale, zero, bits=3)
    evaluated = dequantize_groups(codes, scale, zero, 16)
    packed = to_spqr_weight(codes, scale, zero, bits=3, group_size=16)
    assert np.array_equal(packed.dequantize(), evaluated.numpy())


@pytest.mark.parametrize("kind,abits", [("llama", 8), ("opt", 16)])
def test_transform_plan_rebuilds_the_full_precision_model(kind, abits):
    """The result's `TransformPlan`: `full_precision_model` gives back the weights before the merge (a bias the merge
    added is removed again); `export_copy` installs the transforms on it — an exact rewrite, so its logits are the
    original model's — and removes the hooks on exit. `activation_bits` carries `abits`."""
    from qcompiler.quantize.transforms import TransformPlan

    model = tiny_model(kind)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _calib(1, 12, seed=1)[0]
    with torch.no_grad():
        ref_logits = model(ids).logits
    res = AffineQuant(AffineQuantConfig(bits=3, group_size=16, epochs=1, abits=abits)).quantize(
        model, family_for(model), calibration=_calib(2, 16), progress=False)
    assert isinstance(res.transforms, TransformPlan) and res.activation_bits == abits
    assert set(res.transforms.expected) == set(res.layers)
    fp = res.transforms.full_precision_model(model)
    assert dict(fp.named_parameters()).keys() == reference.keys()
    for name, p in fp.named_parameters():
        assert torch.equal(p.detach(), reference[name]), name
    with res.transforms.export_copy(model) as fp:
        with torch.no_grad():
            logits = fp(ids).logits
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in fp.modules())
        assert hooks > 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in fp.modules()) == 0
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
