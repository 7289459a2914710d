"""Calibration engine: captured layer-0 inputs, Hessians vs a plain forward of the (partly) quantized model, solver
order, true-sequential vs not, chunking, early-stopped forwards, bad solver results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import tiny_model

from qcompiler import QCompilerError
from qcompiler.quantize import calibration as cal
from qcompiler.quantize.calibration import LayerQuantization, capture_layer_inputs, quantize_blockwise
from qcompiler.models.families import family_for, quantizable_linears
from qcompiler.quantize.methods.base import dequantize_groups, layer_report, round_to_nearest, to_spqr_weight

SEQ = 24


def _windows(n=5, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, seq), generator=g) for _ in range(n)]


def _rtn_solver(calls=None, hessians=None, bits=2, group_size=16):
    """A real (weight-changing) solver: RTN, recording call order and Hessians."""

    def solve(path, linear, H):
        if calls is not None:
            calls.append(path)
        if hessians is not None:
            hessians[path] = H.clone()
        w = linear.weight.detach().float()
        codes, scale, zero = round_to_nearest(w, bits=bits, group_size=group_size)
        evaluated = dequantize_groups(codes, scale, zero, group_size)
        packed = to_spqr_weight(codes, scale, zero, bits=bits, group_size=group_size, bias=linear.bias)
        return LayerQuantization(evaluated=evaluated, packed=packed, report=layer_report(w, evaluated, packed))

    return solve


def _identity_solver(calls, hessians):
    rtn = _rtn_solver()

    def solve(path, linear, H):
        calls.append(path)
        hessians[path] = H.clone()
        packed = rtn(path, linear, H).packed
        w = linear.weight.detach().float().clone()
        return LayerQuantization(evaluated=w, packed=packed, report=layer_report(w, w, packed))

    return solve


def _forward_hessians(model, windows) -> dict[str, torch.Tensor]:
    """2/n Σ x xᵀ of every quantizable linear's input from plain full-model forwards (eager attention)."""
    family = family_for(model)
    linears = quantizable_linears(model, family)
    H = {p: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for p, m in linears.items()}

    def hook_for(path):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[path] += 2.0 / len(windows) * x.T @ x

        return hook

    handles = [m.register_forward_pre_hook(hook_for(p)) for p, m in linears.items()]
    try:
        with torch.no_grad():
            for w in windows:
                model(w)
    finally:
        for h in handles:
            h.remove()
    return {p: h.float() for p, h in H.items()}


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_capture_layer_inputs(kind):
    model = tiny_model(kind)
    family = family_for(model)
    windows = _windows(n=3)
    with torch.no_grad():
        inputs = capture_layer_inputs(model, family, windows)
        ref = [model(w, output_hidden_states=True).hidden_states[0] for w in windows]
    assert inputs.hidden.shape == (3, SEQ, 64) and inputs.hidden.dtype == torch.float32
    for i, r in enumerate(ref):
        torch.testing.assert_close(inputs.hidden[i], r[0], rtol=0, atol=0)
    assert inputs.call_of == [0, 0, 0] and len(inputs.calls) == 1  # the same kwargs for all windows, kept once
    kwargs = inputs.calls[0][1]
    assert kwargs.get("use_cache") in (False, None) and kwargs.get("cache") is None


def test_chunks_split_on_call_change():
    inputs = cal.LayerInputs(hidden=torch.zeros(7, 1, 1), calls=[((), {}), ((), {})], call_of=[0, 0, 0, 1, 1, 0, 0])
    assert inputs.chunks(2) == [(0, 2), (2, 3), (3, 5), (5, 7)]
    assert inputs.chunks(10) == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_identity_solver_keeps_model_and_sees_all_linears_in_order(kind):
    model = tiny_model(kind)
    family = family_for(model)
    windows = _windows()
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    calls, hessians = [], {}
    result = quantize_blockwise(model, family, windows, _identity_solver(calls, hessians), progress=False)
    linears = quantizable_linears(model, family)
    assert calls == list(linears)  # layer by layer, in sequential-group order
    assert set(result.layers) == set(linears) and set(result.report) == set(linears)
    for path, m in linears.items():
        assert hessians[path].shape == (m.in_features, m.in_features)
        d = torch.diagonal(hessians[path])  # (OPT fc2: a ReLU feature can be dead, H_jj = 0)
        assert torch.isfinite(hessians[path]).all() and float(d.min()) >= 0 and float(d.sum()) > 0
    assert model.config._attn_implementation == "eager" and not model.training  # restored
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # the engine's Hessians are those of a plain forward (block i's outputs fed block i+1)
    ref = _forward_hessians(model, windows)
    for path in linears:
        assert _close(hessians[path], ref[path]), path


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_true_sequential_hessians_see_quantized_predecessors(kind):
    model = tiny_model(kind)
    original = tiny_model(kind)
    family = family_for(model)
    windows = _windows()
    hessians = {}
    quantize_blockwise(model, family, windows, _rtn_solver(hessians=hessians), true_sequential=True, progress=False)
    # each linear's H is what it sees in the final quantized model: earlier layers *and* earlier groups quantized
    quantized_ref = _forward_hessians(model, windows)
    original_ref = _forward_hessians(original, windows)
    for path in quantizable_linears(model, family):
        assert _close(hessians[path], quantized_ref[path]), path
    # and that differs from the unquantized model beyond the first group of layer 0
    first = f"{family.layers}.0.{family.sequential[0][0]}"
    second = f"{family.layers}.0.{family.sequential[1][0]}"
    assert _close(hessians[first], original_ref[first])
    assert not _close(hessians[second], original_ref[second])


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_not_true_sequential_calibrates_layer_on_its_unquantized_self(kind):
    model = tiny_model(kind)
    original = tiny_model(kind)
    family = family_for(model)
    windows = _windows()
    hessians = {}
    quantize_blockwise(model, family, windows, _rtn_solver(hessians=hessians), true_sequential=False, progress=False)
    original_ref = _forward_hessians(original, windows)
    quantized_ref = _forward_hessians(model, windows)
    layer0 = quantizable_linears(original, family)
    for path in (p for p in layer0 if p.startswith(f"{family.layers}.0.")):
        assert _close(hessians[path], original_ref[path]), path  # layer 0: nothing quantized before it
    # layer 1 sees the quantized layer 0 (its first group: exactly the final model's input)
    path = f"{family.layers}.1.{family.sequential[0][0]}"
    assert _close(hessians[path], quantized_ref[path]) and not _close(hessians[path], original_ref[path])


def test_chunked_forward_matches_one_chunk(monkeypatch):
    windows = _windows(n=5)
    runs = []
    for tokens in (SEQ * 2, SEQ * 100):  # 2 windows per chunk (ragged last chunk) vs all at once
        monkeypatch.setattr(cal, "CHUNK_TOKENS", tokens)
        model = tiny_model("llama")
        hessians = {}
        quantize_blockwise(model, family_for(model), windows, _rtn_solver(hessians=hessians), progress=False)
        runs.append(hessians)
    for path in runs[0]:
        assert _close(runs[0][path], runs[1][path]), path


def test_forwards_stop_early(monkeypatch):
    monkeypatch.setattr(cal, "CHUNK_TOKENS", SEQ * 2)  # 5 windows -> 3 chunks
    model = tiny_model("llama")
    family = family_for(model)
    counts = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            layer.get_submodule(name).register_forward_hook(
                lambda *_, key=(i, name): counts.__setitem__(key, counts.get(key, 0) + 1)
            )
    quantize_blockwise(model, family, _windows(n=5), _rtn_solver(), true_sequential=True, progress=False)
    # every layer: q_proj runs in the o, gate/up and down stages and the output forward (the q/k/v stage stops at its
    # input); down_proj only in the output forward. The last layer's output forward feeds the lm_head's Hessian.
    for i in range(2):
        assert counts[(i, "self_attn.q_proj")] == 4 * 3 and counts.get((i, "mlp.down_proj"), 0) == 3


def test_bad_inputs_and_solver_results():
    model = tiny_model("llama")
    family = family_for(model)
    with pytest.raises(QCompilerError, match="at least one"):
        quantize_blockwise(model, family, [], _rtn_solver(), progress=False)
    with pytest.raises(QCompilerError, match="same length"):
        quantize_blockwise(model, family, [torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)],
                           _rtn_solver(), progress=False)

    def truncated(path, linear, H):
        r = _rtn_solver()(path, linear, H)
        return LayerQuantization(evaluated=r.evaluated[:, :-1], packed=r.packed, report=r.report)

    with pytest.raises(QCompilerError, match=r"layers\.0\.self_attn\.q_proj: solver result has shape \(64, 63\)"):
        quantize_blockwise(model, family, _windows(n=2), truncated, progress=False)
    assert model.config._attn_implementation == "eager"  # restored after an error too
    with pytest.raises(QCompilerError, match="not LayerQuantization"):
        quantize_blockwise(model, family, _windows(n=2), lambda p, m, H: (m.weight, None), progress=False)


@pytest.mark.parametrize("K", [1, 7, 512, 513, 1200])
def test_hessian_lower_triangle_accumulation_equals_full(K, monkeypatch):
    """The blocked lower-triangle accumulation (several row blocks for K > HESSIAN_BLOCK) equals 2/n Σ x xᵀ and is
    exactly symmetric; the running average over unequal batches weighs windows, not batches."""
    monkeypatch.setattr(cal, "HESSIAN_BLOCK", 256)
    g = torch.Generator().manual_seed(K)
    x = torch.randn(5, 33, K, generator=g)
    h = cal.Hessian(K)
    h.add(x[:2], 2)
    h.add(x[2:], 3)
    H = h.value()
    flat = x.reshape(-1, K).double()
    ref = 2.0 / 5 * flat.T @ flat
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_parallel_solves_give_identical_results_in_order(true_sequential):
    """Solving a stage's linears in threads changes neither the results nor their order, and restores torch's
    thread count; the solver really runs on several threads (a SpQR solve: many small ops)."""
    import threading

    from qcompiler.quantize.methods.spqr import SpQRConfig, spqr_quantize_layer

    cfg = SpQRConfig(bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_threshold=0.2)
    threads = set()

    def solve(path, linear, H):
        threads.add(threading.get_ident())
        return spqr_quantize_layer(linear.weight.detach(), H, config=cfg, bias=linear.bias)

    results = []
    for parallel in (1, 2):
        model = tiny_model("llama")
        saved = torch.get_num_threads()
        results.append(quantize_blockwise(model, family_for(model), _windows(), solve, progress=False,
                                          true_sequential=true_sequential, parallel_solves=parallel))
        assert torch.get_num_threads() == saved
    assert len(threads) > 1
    serial, parallel = results
    assert list(serial.layers) == list(parallel.layers)
    for path, w in serial.layers.items():
        assert np.array_equal(w.dequantize(), parallel.layers[path].dequantize()), path
