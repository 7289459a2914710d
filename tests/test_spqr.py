"""SpQR: bit-exact decode of what the solver evaluated, outliers vs τ, stored bits, error vs RTN, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.helpers import VOCAB, tiny_model

from qcompiler import QCompilerError
from qcompiler.models.families import family_for, quantizable_linears
from qcompiler.quantize.methods import get_method
from qcompiler.quantize.methods.base import dequantize_groups, round_to_nearest
from qcompiler.quantize.methods.gptq import gptq_quantize_layer
from qcompiler.quantize.methods.spqr import (SpQR, SpQRConfig, leave_one_out_reduction, paper_avg_bits, spqr_quantize_layer,
                                            spqr_round_layer)

INF = float("inf")


def _problem(N=44, K=84, n=512, seed=0):
    """A weight with a few heavy entries and the Hessian `2/n XᵀX` of correlated, unevenly scaled inputs X.

    N=44, K=84 with β1=β2=16 gives a ragged last group along both K (4 columns) and N (12 rows).
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + torch.randn(K, K, generator=g) / math.sqrt(K)
    X = (torch.randn(n, K, generator=g) @ mix) * (torch.rand(K, generator=g) * 2 + 0.1)
    H = 2 / n * X.T @ X
    W = torch.randn(N, K, generator=g) * 0.02
    W[torch.rand(N, K, generator=g) < 0.01] *= 8
    return W, H, X


def _output_error(X, W, Wq):
    return float((X @ (W - Wq).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("stat_bits", [0, 3])
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_equals_evaluated_bit_exact(act_order, stat_bits, bits):
    W, H, _ = _problem()
    cfg = SpQRConfig(bits=bits, stat_bits=stat_bits, act_order=act_order, outlier_threshold=0.2)
    r = spqr_quantize_layer(W, H, config=cfg)
    p = r.packed
    assert r.evaluated.dtype == torch.float32 and r.evaluated.shape == W.shape
    assert np.array_equal(p.dequantize(), r.evaluated.numpy())  # what the op decodes is what was evaluated
    assert (p.N, p.K, p.bits, p.group_size, p.n_groups) == (44, 84, bits, 16, 6)
    assert p.stat_bits == stat_bits and (p.stats2 is None) == (stat_bits == 0)
    if stat_bits:
        assert p.scales.dtype == np.uint8 and p.stats2.shape == (6, 3, 4) and p.stats2.dtype == np.float16
        s, z = p.group_stats()  # [N, G]: within β2 rows of a group, at most 2^stat_bits distinct values
        for rows in (slice(0, 16), slice(16, 32), slice(32, 44)):
            for g in range(6):
                assert len(np.unique(s[rows, g])) <= 8 and len(np.unique(z[rows, g])) <= 8
        assert np.all(s > 0)
    else:
        assert p.scales.dtype == p.zeros.dtype == np.float16
    assert (p.perm is not None) == act_order
    if act_order:
        assert np.array_equal(p.perm, np.argsort(-np.diag(H.numpy()), kind="stable"))
    # outliers are present, stored as CSR with strictly increasing columns, and are fp16 deltas
    assert p.nnz > 0 and r.report["outlier_share"] == p.nnz / (44 * 84)
    ptr, cols = p.outlier_row_ptr, p.outlier_col_idx.astype(np.int64)
    assert ptr[0] == 0 and ptr[-1] == p.nnz and np.all(np.diff(ptr) >= 0) and np.all(cols < 84)
    for n in range(44):
        assert np.all(np.diff(cols[ptr[n] : ptr[n + 1]]) > 0)
    assert np.all(p.outlier_values != 0)
    assert 0 < r.report["rel_error"] < 0.5


def test_outliers_are_additive_fp16_deltas_over_the_dense_decode():
    W, H, _ = _problem(seed=1)
    r = spqr_quantize_layer(W, H, config=SpQRConfig(outlier_threshold=0.1, act_order=False))
    p = r.packed
    p_no = type(p)(**{**p.__dict__, "outlier_row_ptr": None, "outlier_col_idx": None, "outlier_values": None})
    dense = p_no.dequantize_stored()
    rows = np.repeat(np.arange(p.N), np.diff(p.outlier_row_ptr))
    cols = p.outlier_col_idx.astype(np.int64)
    ev = r.evaluated.numpy()
    assert np.array_equal(ev[rows, cols], dense[rows, cols] + p.outlier_values.astype(np.float32))
    mask = np.zeros_like(ev, dtype=bool)
    mask[rows, cols] = True
    assert np.array_equal(ev[~mask], dense[~mask])
    # an outlier weight is represented much better than the grid would: compare errors at outliers vs elsewhere
    err = np.abs(ev - W.numpy())
    assert np.median(err[mask]) < np.median(err[~mask])


def test_outlier_share_falls_as_tau_grows():
    W, H, _ = _problem(N=48, K=96)
    shares = []
    for tau in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, INF):
        r = spqr_quantize_layer(W, H, config=SpQRConfig(outlier_threshold=tau))
        shares.append(r.report["outlier_share"])
        assert np.array_equal(r.packed.dequantize(), r.evaluated.numpy())
    assert all(a >= b for a, b in zip(shares, shares[1:])), shares
    assert shares[0] > 0.03 and shares[0] > 5 * shares[3] > 0
    assert shares[-1] == 0


def test_no_outliers_at_infinite_tau():
    W, H, _ = _problem()
    r = spqr_quantize_layer(W, H, config=SpQRConfig(outlier_threshold=INF))
    p = r.packed
    assert p.nnz == 0 and p.outlier_row_ptr is None and p.stored_bits()["outliers"] == 0
    assert np.array_equal(p.dequantize(), r.evaluated.numpy())


@pytest.mark.parametrize("stat_bits", [0, 2, 3])
def test_avg_bits_counted_from_arrays(stat_bits):
    N, K, b1, b2 = 44, 84, 16, 16
    W, H, _ = _problem(N=N, K=K)
    r = spqr_quantize_layer(W, H, config=SpQRConfig(bits=3, stat_bits=stat_bits, outlier_threshold=0.2))
    p = r.packed
    G, N2 = math.ceil(K / b1), math.ceil(N / b2)
    codes = N * math.ceil(K / 32) * 32 * 3
    stats = 2 * 16 * G * N if stat_bits == 0 else 2 * G * math.ceil(N / 32) * 32 * stat_bits + G * N2 * 64
    outliers = p.nnz * 32 + 32 * (N + 1)
    perm = 32 * K
    assert p.nnz > 0
    assert sum(p.stored_bits().values()) == codes + stats + outliers + perm
    assert r.report["avg_bits"] == p.avg_bits() == (codes + stats + outliers + perm) / (N * K)


def test_paper_formula_matches_stored_bits_up_to_row_pointers_and_perm():
    N, K = 64, 128  # no padding anywhere: every difference is the CSR row pointers and the permutation
    W, H, _ = _problem(N=N, K=K)
    r = spqr_quantize_layer(W, H, config=SpQRConfig())
    share = r.report["outlier_share"]
    paper = 4 + 2 * 3 / 16 + 64 / (16 * 16) + 32 * share
    assert r.report["paper_avg_bits"] == pytest.approx(paper)
    assert paper_avg_bits(bits=4, group_size=16, stat_bits=0, stat_group_size=16, outlier_share=0) == 6.0
    assert r.report["avg_bits"] == pytest.approx(paper + (32 * (N + 1) + 32 * K) / (N * K))


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("stat_bits, tau", [(0, INF), (3, 0.2), (3, INF)])
def test_round_layer_is_the_format_without_error_feedback(act_order, stat_bits, tau):
    """The probe's feedback-free variant: decodes bit for bit to what it evaluated, equals SpQR with a diagonal
    Hessian's worth of feedback (huge damping: no error propagates), and is worse than SpQR proper."""
    W, H, X = _problem()
    cfg = SpQRConfig(bits=3, stat_bits=stat_bits, outlier_threshold=tau, act_order=act_order,
                     simplified_outliers=True)
    r = spqr_round_layer(W, H, config=cfg)
    assert np.array_equal(r.packed.dequantize(), r.evaluated.numpy())
    if tau == INF:  # (with outliers the damping also changes U's diagonal, hence the threshold: only without)
        damped = spqr_quantize_layer(W, H, config=SpQRConfig(bits=3, stat_bits=stat_bits, outlier_threshold=tau,
                                                               act_order=act_order, percdamp=1e9))
        assert torch.allclose(damped.evaluated, r.evaluated, atol=1e-6)
        if act_order is False:  # in input order, bit for bit
            assert np.array_equal(r.packed.dequantize(), damped.packed.dequantize())
    full = spqr_quantize_layer(W, H, config=cfg)
    assert _output_error(X, W, full.evaluated) < _output_error(X, W, r.evaluated)


def test_spqr_beats_rtn_on_correlated_inputs():
    W, H, X = _problem(N=48, K=96)
    rtn = dequantize_groups(*round_to_nearest(W, bits=3, group_size=16, round_zero=False), 16)
    e_rtn = _output_error(X, W, rtn)
    for tau, stat_bits in ((INF, 0), (INF, 3), (0.2, 3)):
        r = spqr_quantize_layer(W, H, config=SpQRConfig(bits=3, stat_bits=stat_bits, outlier_threshold=tau))
        assert _output_error(X, W, r.evaluated) < 0.9 * e_rtn, (tau, stat_bits)


@pytest.mark.parametrize(
    "bits, group_size, block_size, act_order, percdamp",
    [(3, 16, 32, True, 1.0), (4, 16, 128, False, 0.01), (2, 8, 16, True, 0.1), (4, 32, 64, True, 1.0)],
)
def test_infinite_tau_equals_gptq_on_the_same_grid(bits, group_size, block_size, act_order, percdamp):
    """SpQR without outliers and with fp16 statistics is GPTQ with the exact min-max grid (round_zero off: SpQR's
    first-level zero is real-valued; GPTQ's default integer zero with a range widened to 0 is a different grid).
    Equal bit for bit when the block size is a multiple of the group size (GPTQ aligns its blocks to groups; SpQR,
    like its reference, lets a group straddle a block and fits it partly on not-yet-updated columns)."""
    W, H, _ = _problem(N=44, K=84)
    spqr = spqr_quantize_layer(W, H, config=SpQRConfig(
        bits=bits, group_size=group_size, stat_bits=0, outlier_threshold=INF, act_order=act_order,
        percdamp=percdamp, block_size=block_size))
    gptq = gptq_quantize_layer(W, H, bits=bits, group_size=group_size, act_order=act_order, percdamp=percdamp,
                               block_size=block_size, round_zero=False)
    assert torch.equal(spqr.evaluated, gptq.evaluated)
    a, b = spqr.packed, gptq.packed
    for name in ("qweight", "scales", "zeros"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.perm is None) == (b.perm is None) == (not act_order)
    assert a.perm is None or np.array_equal(a.perm, b.perm)
    assert a.avg_bits() == b.avg_bits()
    # ...and outliers or quantized statistics make it a different (here: better) quantizer
    with_outliers = spqr_quantize_layer(W, H, config=SpQRConfig(
        bits=bits, group_size=group_size, stat_bits=0, outlier_threshold=0.2, act_order=act_order,
        percdamp=percdamp, block_size=block_size))
    assert with_outliers.packed.nnz > 0 and with_outliers.report["rel_error"] < spqr.report["rel_error"]


def test_dead_inputs_quantize_to_zero():
    W, H, _ = _problem(K=80)
    dead = torch.arange(80) % 5 == 0  # 16 dead inputs: act_order moves them into the last group
    H[dead, :] = 0
    H[:, dead] = 0
    r = spqr_quantize_layer(W, H, config=SpQRConfig())
    assert torch.all(r.evaluated[:, dead] == 0)
    assert np.array_equal(r.packed.dequantize(), r.evaluated.numpy())


def test_leave_one_out_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 16, generator=g)
    w[2, 5] = 6.0  # an obvious outlier
    w[4] = w[4, 0]  # a constant row
    w[4, 9] = 1.5  # ... but for one weight
    d = torch.rand(16, generator=g) + 0.5
    bits, maxq = 3, 7

    def fit_err(x, dd):
        lo, hi = x.min(), x.max()
        if lo == hi:
            hi = hi + (abs(lo) if lo != 0 else 1.0)
        s = (hi - lo) / maxq
        z = -lo / s
        q = torch.clamp(torch.round(x / s + z), 0, maxq)
        return (((s * (q - z)) - x) / dd).square().sum()

    expected = torch.zeros_like(w)
    for n in range(7):
        base = fit_err(w[n], d)
        for i in range(16):
            keep = torch.arange(16) != i
            expected[n, i] = base - fit_err(w[n, keep], d[keep])
    got = leave_one_out_reduction(w, d, bits=bits)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert int(got[2].argmax()) == 5 and int(got[4].argmax()) == 9


def test_simplified_outliers_and_block_size():
    W, H, _ = _problem()
    for cfg in (SpQRConfig(simplified_outliers=True), SpQRConfig(block_size=24), SpQRConfig(block_size=1000)):
        r = spqr_quantize_layer(W, H, config=cfg)
        assert np.array_equal(r.packed.dequantize(), r.evaluated.numpy())
        assert r.packed.nnz > 0
    # groups inside one block see the same (fully updated) weights whatever the block size: equal up to rounding
    a = spqr_quantize_layer(W, H, config=SpQRConfig(block_size=16, outlier_threshold=INF)).evaluated
    b = spqr_quantize_layer(W, H, config=SpQRConfig(block_size=128, outlier_threshold=INF)).evaluated
    assert (a != b).float().mean() < 0.01  # (in practice identical: the codes absorb the rounding differences)


def test_quantize_model_in_place():
    model = tiny_model("qwen2")  # q/k/v carry biases, o and the MLP do not
    family = family_for(model.config)
    before = {p: m.weight.detach().clone() for p, m in quantizable_linears(model, family).items()}
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, VOCAB, (1, 32), generator=g) for _ in range(4)]
    cfg = SpQRConfig(bits=3, outlier_threshold=0.5)
    result = SpQR(cfg).quantize(model, family, calibration=calibration, progress=False)
    assert set(result.layers) == set(before)
    assert result.config == {"method": "spqr", **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}}
    linears = quantizable_linears(model, family)
    for path, packed in result.layers.items():
        lin = linears[path]
        assert np.array_equal(lin.weight.detach().numpy(), packed.dequantize()), path  # fake-quant = decoded
        assert packed.stat_bits == 3 and packed.perm is not None
        assert (packed.bias is None) == (lin.bias is None)
        rep = result.report[path]
        assert rep["avg_bits"] == packed.avg_bits() and 0 < rep["rel_error"] < 0.5
    assert result.totals["outlier_share"] > 0 and 3 < result.totals["avg_bits"] < 6


def test_registry_and_defaults():
    assert get_method("spqr") is SpQR and SpQR.Config is SpQRConfig and SpQR.needs_calibration
    c = SpQRConfig()
    assert (c.bits, c.group_size, c.stat_bits, c.stat_group_size, c.outlier_threshold) == (4, 16, 3, 16, 0.2)
    assert c.act_order and c.percdamp == 1.0 and c.block_size == 128 and not c.true_sequential
    assert not c.simplified_outliers
    with pytest.raises(TypeError):
        SpQRConfig(3, 16)  # noqa
    with pytest.raises(QCompilerError, match="calibration"):
        SpQR().quantize(torch.nn.Linear(4, 4), None, calibration=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), r"^bits must be 2, 3, 4 or 8 \(got 5\)$"),
        (dict(group_size=4), r"^group_size must be an integer in 8\.\.128 \(got 4\)$"),
        (dict(group_size=256), r"^group_size must be an integer in 8\.\.128 \(got 256\)$"),
        (dict(stat_group_size=7), r"^stat_group_size must be an integer in 8\.\.128 \(got 7\)$"),
        (dict(stat_bits=1), r"^stat_bits must be 0 \(fp16 statistics\), 2, 3 or 4 \(got 1\)$"),
        (dict(stat_bits=5), r"stat_bits must be"),
        (dict(outlier_threshold=-0.1), r"^outlier_threshold must be >= 0 or inf"),
        (dict(outlier_threshold=float("nan")), r"^outlier_threshold must be >= 0 or inf"),
        (dict(percdamp=-1.0), r"^percdamp must be a finite number >= 0"),
        (dict(block_size=0), r"^block_size must be a positive integer"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(QCompilerError, match=message):
        SpQRConfig(**kwargs)


def test_hessian_shape_mismatch():
    W, H, _ = _problem()
    with pytest.raises(QCompilerError, match="Hessian shape"):
        spqr_quantize_layer(W, H[:10, :10], config=SpQRConfig())
