"""RTN: codes and statistics, error vs bits, ragged groups, in-place fake-quant, bit-exact decode vs the format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers import tiny_model

from qcompiler import QCompilerError
from qcompiler.models.families import family_for, quantizable_linears
from qcompiler.quantize.methods import available_methods, get_method
from qcompiler.quantize.methods.base import Method, dequantize_groups, round_to_nearest, to_spqr_weight
from qcompiler.quantize.methods.rtn import RTN, RTNConfig


def _weight(N=24, K=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05


def test_registry():
    assert "rtn" in available_methods()
    assert get_method("rtn") is RTN and RTN.Config is RTNConfig and not RTN.needs_calibration
    assert issubclass(RTN, Method) and RTN.name == "rtn"
    with pytest.raises(QCompilerError, match=r"unknown method 'nope': available methods are .*rtn"):
        get_method("nope")


@pytest.mark.parametrize("bits", [5, 1, 16])
def test_invalid_bits(bits):
    with pytest.raises(QCompilerError, match=rf"^bits must be 2, 3, 4 or 8 \(got {bits}\)$"):
        RTNConfig(bits=bits)


@pytest.mark.parametrize("gs", [0, -16])
def test_invalid_group_size(gs):
    with pytest.raises(QCompilerError, match="group size"):
        RTNConfig(group_size=gs)


def test_config_keyword_only():
    with pytest.raises(TypeError):
        RTNConfig(3, 16)  # noqa


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 32, 7])
def test_codes_stats_and_bit_exact_decode(bits, group_size):
    w = _weight()
    codes, scale, zero = round_to_nearest(w, bits=bits, group_size=group_size)
    G = math.ceil(w.shape[1] / group_size)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= 2**bits - 1 and int(codes.max()) == 2**bits - 1  # the range is used fully
    assert scale.shape == zero.shape == (w.shape[0], G)
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.half().float())
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1
    evaluated = dequantize_groups(codes, scale, zero, group_size)
    packed = to_spqr_weight(codes, scale, zero, bits=bits, group_size=group_size)
    assert np.array_equal(packed.codes(), codes.numpy())
    assert np.array_equal(packed.dequantize(), evaluated.numpy())  # bit for bit
    # error is within one step of the stored grid (half a step inside the range; rounding the zero point can
    # leave the group's extreme value up to one step outside the grid)
    g = torch.arange(w.shape[1]) // group_size
    assert torch.all((w - evaluated).abs() <= scale[:, g] * (1 + 1e-3))


def test_codes_are_nearest_for_stored_stats():
    w = _weight(seed=3)
    bits, gs = 3, 16
    codes, scale, zero = round_to_nearest(w, bits=bits, group_size=gs)
    g = torch.arange(w.shape[1]) // gs
    s, z = scale[:, g], zero[:, g]
    grid = s[..., None] * (torch.arange(2**bits).float() - z[..., None])  # [N, K, levels]
    best = (w[..., None] - grid).abs().min(dim=-1).values
    got = (w - dequantize_groups(codes, scale, zero, gs)).abs()
    assert torch.all(got <= best + 1e-6)


def test_error_decreases_with_bits():
    w = _weight(N=64, K=128)
    errs = {}
    for bits in (2, 3, 4):
        codes, s, z = round_to_nearest(w, bits=bits, group_size=32)
        errs[bits] = float((w - dequantize_groups(codes, s, z, 32)).norm() / w.norm())
    assert errs[4] < errs[3] < errs[2] < 1.0
    assert errs[4] < 0.1


def test_ragged_last_group():
    K, gs = 40, 16  # groups of 16, 16, 8
    w = _weight(N=8, K=K)
    w[:, 32:] *= 100  # the ragged group has its own, much larger, scale
    codes, scale, zero = round_to_nearest(w, bits=4, group_size=gs)
    assert scale.shape == (8, 3)
    assert torch.all(scale[:, 2] > 20 * scale[:, 1])
    # the ragged group alone quantizes the same as a standalone 8-column group
    c2, s2, z2 = round_to_nearest(w[:, 32:], bits=4, group_size=8)
    assert torch.equal(codes[:, 32:], c2) and torch.equal(scale[:, 2:], s2) and torch.equal(zero[:, 2:], z2)
    packed = to_spqr_weight(codes, scale, zero, bits=4, group_size=gs)
    assert packed.n_groups == 3
    assert np.array_equal(packed.dequantize(), dequantize_groups(codes, scale, zero, gs).numpy())


def test_zero_and_constant_groups():
    w = torch.zeros(4, 32)
    w[1] = 0.5  # constant positive row: range widened to [0, 0.5]
    codes, scale, zero = round_to_nearest(w, bits=3, group_size=16)
    ev = dequantize_groups(codes, scale, zero, 16)
    assert torch.all(torch.isfinite(ev))
    assert torch.equal(ev[0], torch.zeros(32)) and torch.allclose(ev[1], torch.full((32,), 0.5), atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "opt", "qwen2"])
def test_quantize_model_in_place(kind):
    model = tiny_model(kind)
    family = family_for(model.config)
    before = {p: m.weight.detach().clone() for p, m in quantizable_linears(model, family).items()}
    other_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".weight") or
                    n.rsplit(".", 1)[0] not in before}
    result = RTN(RTNConfig(bits=3, group_size=16)).quantize(model, family, progress=False)
    assert set(result.layers) == set(before)
    assert result.config == {"method": "rtn", "bits": 3, "group_size": 16, "round_zero": True}
    linears = quantizable_linears(model, family)
    for path, packed in result.layers.items():
        lin = linears[path]
        assert np.array_equal(lin.weight.detach().numpy(), packed.dequantize())  # model holds the fake-quant weight
        assert not torch.equal(lin.weight, before[path])
        if lin.bias is not None:
            assert np.array_equal(packed.bias, lin.bias.detach().numpy())
        else:
            assert packed.bias is None
        rep = result.report[path]
        stored = sum(packed.stored_bits().values())
        assert rep["avg_bits"] == pytest.approx(stored / (packed.N * packed.K))
        N, K = lin.weight.shape
        G = math.ceil(K / 16)
        assert stored == N * math.ceil(K / 32) * 32 * 3 + 2 * 16 * G * N  # codes + fp16 scale and zero
        expected_err = float((before[path] - lin.weight.detach()).norm() / before[path].norm())
        assert rep["rel_error"] == pytest.approx(expected_err, rel=1e-5) and 0 < rep["rel_error"] < 0.5
        assert rep["outlier_share"] == 0
    for n, p in model.named_parameters():  # nothing else changed (embeddings, norms, lm_head, biases)
        if n in other_before:
            assert torch.equal(p, other_before[n]), n
    t = result.totals
    assert t["layers"] == len(result.layers) and t["params"] == sum(w.N * w.K for w in result.layers.values())
    assert 3 < t["avg_bits"] < 6


def test_default_config_and_pipeline_style_construction():
    model = tiny_model("llama")
    m = get_method("rtn")()
    assert m.config == RTNConfig()
    res = get_method("rtn")(RTNConfig(bits=4, group_size=64)).quantize(model, family_for(model.config), progress=False)
    assert all(w.group_size == 64 and w.bits == 4 and w.stat_bits == 0 for w in res.layers.values())


def test_round_zero_false_exact_range():
    # weights already on an asymmetric 4-bit grid with groups of 32 (GGUF Q4_1: w = d·q + m, m not a multiple of d)
    g = torch.Generator().manual_seed(5)
    N, K, gs = 16, 64, 32
    d = (torch.rand(N, K // gs, generator=g) * 0.01 + 0.002).half().float()
    m = (-(torch.rand(N, K // gs, generator=g) * 7.3) * d).half().float()
    q = torch.randint(0, 16, (N, K), generator=g).float()
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15  # every group spans the full range
    w = d.repeat_interleave(gs, 1) * q + m.repeat_interleave(gs, 1)
    err = {}
    for rz in (True, False):
        codes, scale, zero = round_to_nearest(w, bits=4, group_size=gs, round_zero=rz)
        ev = dequantize_groups(codes, scale, zero, gs)
        err[rz] = float((w - ev).norm() / w.norm())
        packed = to_spqr_weight(codes, scale, zero, bits=4, group_size=gs)
        assert np.array_equal(packed.dequantize(), ev.numpy())
    assert err[False] < 2e-3 < err[True]  # real-valued zero recovers the grid up to fp16 rounding of the stats
    # a constant group is represented (up to fp16 rounding of the scale)
    c = torch.full((2, 16), 0.37)
    codes, scale, zero = round_to_nearest(c, bits=3, group_size=16, round_zero=False)
    assert torch.allclose(dequantize_groups(codes, scale, zero, 16), c, rtol=1e-3)
