"""GPTQ: output error vs RTN on correlated inputs, bit-exact decode vs the format (act_order, ragged groups),
groups in stored (permuted) order, dead features, damping errors, config checks, the method on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers import tiny_model

from qcompiler import QCompilerError
from qcompiler.models.families import family_for, quantizable_linears
from qcompiler.quantize.methods import available_methods, get_method
from qcompiler.quantize.methods.base import Method, dequantize_groups, round_to_nearest
from qcompiler.quantize.methods.gptq import GPTQ, GPTQConfig, gptq_quantize_layer


def _problem(N=48, K=200, T=1500, seed=0):
    """Weight `[N, K]`, correlated inputs `X [T, K]` (random mixing + per-feature scales) and `H = 2/T XᵀX`."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 1.5 * torch.randn(K, K, generator=g) / math.sqrt(K)
    X = torch.randn(T, K, generator=g) @ mix * torch.exp(torch.randn(K, generator=g) * 0.5)
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X, 2.0 / T * X.T @ X


def _output_error(X, W, W_hat):
    return float((X @ (W - W_hat).T).norm() / (X @ W.T).norm())


def test_registry_and_contract():
    assert "gptq" in available_methods()
    assert get_method("gptq") is GPTQ and GPTQ.Config is GPTQConfig and GPTQ.needs_calibration
    assert issubclass(GPTQ, Method) and GPTQ.name == "gptq"
    cfg = GPTQConfig()
    assert (cfg.bits, cfg.group_size, cfg.act_order, cfg.percdamp, cfg.block_size, cfg.true_sequential,
            cfg.stat_bits, cfg.round_zero) == (4, 128, True, 0.01, 128, True, 0, True)
    with pytest.raises(TypeError):
        GPTQConfig(3, 16)  # noqa: keyword-only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, r"^bits must be 2, 3, 4 or 8 \(got 5\)$"),
        ({"group_size": 0}, "group size must be a positive integer"),
        ({"percdamp": -0.1}, "percdamp"),
        ({"percdamp": float("nan")}, "percdamp"),
        ({"block_size": 0}, "block_size"),
        ({"stat_bits": 3}, "stat_bits must be 0"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(QCompilerError, match=message):
        GPTQConfig(**kwargs)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_output_error_than_rtn(bits, act_order):
    W, X, H = _problem()
    gs = 32
    codes, scale, zero = round_to_nearest(W, bits=bits, group_size=gs)
    rtn = _output_error(X, W, dequantize_groups(codes, scale, zero, gs))
    gptq = _output_error(X, W, gptq_quantize_layer(W, H, bits=bits, group_size=gs, act_order=act_order).evaluated)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize(
    "bits, act_order, group_size, K",
    [
        (2, False, 16, 200),  # ragged last group (200 = 12·16 + 8)
        (2, True, 64, 200),
        (3, False, 48, 200),  # group does not divide the block (64): effective block 48
        (3, True, 16, 200),
        (4, False, 128, 96),  # one group, larger than K and than the block
        (4, True, 64, 200),
        (4, True, 16, 200),
    ],
)
def test_evaluated_is_the_decoded_format_bit_for_bit(bits, act_order, group_size, K):
    W, _, H = _problem(N=24, K=K, T=400, seed=bits)
    bias = torch.randn(24)
    r = gptq_quantize_layer(W, H, bits=bits, group_size=group_size, act_order=act_order, block_size=64, bias=bias)
    p = r.packed
    assert (p.N, p.K, p.bits, p.group_size, p.stat_bits, p.nnz) == (24, K, bits, group_size, 0, 0)
    assert r.evaluated.dtype == torch.float32 and r.evaluated.shape == (24, K)
    assert np.array_equal(p.dequantize(), r.evaluated.numpy())  # NumPy reference decoder, bit for bit
    assert np.array_equal(p.bias, bias.numpy())
    if act_order:
        assert np.array_equal(p.perm, torch.argsort(torch.diag(H), descending=True, stable=True).numpy())
    else:
        assert p.perm is None
    s, z = p.group_stats()
    assert s.shape == (24, math.ceil(K / group_size)) and np.array_equal(z, np.round(z))  # round_zero: integer
    assert r.report["rel_error"] == pytest.approx(float((W - r.evaluated).norm() / W.norm()), rel=1e-6)
    assert r.report["avg_bits"] == p.avg_bits() and r.report["loss"] > 0


def test_diagonal_hessian_is_rtn_in_stored_order():
    """With a diagonal H there is no error feedback: GPTQ is RTN of the permuted weight, groups over stored columns."""
    N, K, gs = 16, 80, 16
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.1
    d = torch.rand(K, generator=torch.Generator().manual_seed(2)) + 0.5
    r = gptq_quantize_layer(W, torch.diag(d), bits=3, group_size=gs, act_order=True)
    perm = torch.argsort(d, descending=True)
    assert not torch.equal(perm, torch.arange(K))
    codes, scale, zero = round_to_nearest(W[:, perm], bits=3, group_size=gs)
    assert np.array_equal(r.packed.perm, perm.numpy())
    assert np.array_equal(r.packed.codes(), codes.numpy())
    stored = dequantize_groups(codes, scale, zero, gs)
    assert torch.equal(r.evaluated[:, perm], stored)


def test_no_feedback_without_correlation_but_feedback_with_it():
    W, X, H = _problem(K=64)
    independent = gptq_quantize_layer(W, torch.diag(torch.diag(H)), bits=3, group_size=64, act_order=False)
    correlated = gptq_quantize_layer(W, H, bits=3, group_size=64, act_order=False)
    codes, _, _ = round_to_nearest(W, bits=3, group_size=64)
    assert np.array_equal(independent.packed.codes(), codes.numpy())
    assert not np.array_equal(correlated.packed.codes(), codes.numpy())


def test_inputs_unchanged_dead_features_and_damping():
    W, _, H = _problem(N=16, K=48)
    H[7, :] = 0
    H[:, 7] = 0
    W0, H0 = W.clone(), H.clone()
    r = gptq_quantize_layer(W, H, bits=4, group_size=16)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.isfinite(r.evaluated).all() and torch.all(r.evaluated[:, 7] == 0)  # dead feature -> weight 0
    x = torch.ones(48, 1)
    with pytest.raises(QCompilerError, match="percdamp"):
        gptq_quantize_layer(W, x @ x.T, bits=4, group_size=16, percdamp=0.0)  # singular, undamped
    gptq_quantize_layer(W, x @ x.T, bits=4, group_size=16, percdamp=0.01)  # damped: fine


def test_block_size_does_not_change_the_result():
    W, _, H = _problem(N=16, K=96, T=400)
    a = gptq_quantize_layer(W, H, bits=3, group_size=16, block_size=16)
    b = gptq_quantize_layer(W, H, bits=3, group_size=16, block_size=96)
    # the same math in another order: equal up to fp32 rounding (a rare code may flip at a rounding tie)
    assert (a.packed.codes() != b.packed.codes()).mean() <= 0.01
    assert _output_error(torch.eye(96), a.evaluated, b.evaluated) < 1e-3


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_method_on_tiny_model(kind):
    model = tiny_model(kind)
    family = family_for(model)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 128, (1, 32), generator=g) for _ in range(4)]
    ids = torch.randint(3, 128, (1, 16), generator=g)
    with torch.no_grad():
        before = model(ids).logits
    result = GPTQ(GPTQConfig(bits=3, group_size=16)).quantize(model, family, calibration=windows, progress=False)
    linears = quantizable_linears(model, family)
    assert set(result.layers) == set(linears)
    for path, m in linears.items():
        packed = result.layers[path]
        assert np.array_equal(packed.dequantize(), m.weight.detach().numpy()), path  # model holds the evaluated W
        assert packed.perm is not None and (packed.bias is not None) == (m.bias is not None)
    assert result.config == {"method": "gptq", "bits": 3, "group_size": 16, "act_order": True, "percdamp": 0.01,
                             "block_size": 128, "true_sequential": True, "stat_bits": 0, "round_zero": True}
    assert result.totals["layers"] == len(linears) and 0 < result.totals["rel_error"] < 0.5
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_method_needs_calibration():
    model = tiny_model("llama")
    with pytest.raises(QCompilerError, match="calibration"):
        GPTQ().quantize(model, family_for(model), calibration=None, progress=False)
