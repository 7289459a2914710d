"""`--target-bits`: the knapsack allocation, the closed-loop budget, the sensitivity estimate, and the export."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from qcompiler import QCompilerError
from qcompiler.quantize.allocation import MENU, BitBudget, LayerOptions, allocate, describe, layer_prefix
from qcompiler.quantize.sensitivity import output_fisher, weighted_error


def _instance(seed: int, L: int = 6, C: int = 4):
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.uniform(1000, 5000, size=(L, C)), axis=1)
    costs = np.sort(rng.uniform(0.1, 10.0, size=(L, C)), axis=1)[:, ::-1].copy()  # more bits, less cost
    return costs, bits


@pytest.mark.parametrize("seed", range(20))
def test_allocate_fits_the_budget_and_leaves_no_fitting_upgrade(seed):
    costs, bits = _instance(seed)
    rows = np.arange(len(costs))
    budget = float(np.random.default_rng(seed + 100).uniform(bits[:, 0].sum(), bits[:, -1].sum()))
    choice = allocate(costs, bits, budget)
    total = bits[rows, choice].sum()
    assert total <= budget + 1e-6
    slack = budget - total
    for l, c in itertools.product(range(len(costs)), range(costs.shape[1])):  # no single switch both fits and helps
        assert not (0 < bits[l, c] - bits[l, choice[l]] <= slack and costs[l, c] < costs[l, choice[l]])
    # close to the exact optimum (brute force over all C^L assignments)
    best = min(sum(costs[l, c] for l, c in enumerate(cs)) for cs in itertools.product(range(costs.shape[1]),
                                                                                     repeat=len(costs))
               if sum(bits[l, c] for l, c in enumerate(cs)) <= budget)
    assert costs[rows, choice].sum() <= 1.25 * best + 1e-9


def test_allocate_edges():
    costs, bits = _instance(0)
    rows = np.arange(len(costs))
    # a budget for everything: each linear's lowest cost
    assert (allocate(costs, bits, bits.sum()) == costs.argmin(axis=1)).all()
    # exactly the fewest bits: every linear at its fewest
    assert (allocate(costs, bits, bits[:, 0].sum()) == 0).all()
    with pytest.raises(QCompilerError, match="below the fewest"):
        allocate(costs, bits, bits[:, 0].sum() - 1)
    # a setting that is not allowed (inf cost) is never chosen
    costs = costs.copy()
    costs[:, -1] = np.inf
    assert (allocate(costs, bits, bits.sum()) != costs.shape[1] - 1).all()
    assert bits[rows, allocate(costs, bits, bits.sum())].sum() <= bits.sum()


def _budget(L: int = 40, target: float = 3.2, seed: int = 0) -> BitBudget:
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(L):
        params = int(rng.choice([4096, 12288]))
        per_param = np.array([2.3, 2.6, 3.3, 3.9, 4.4, 4.7])
        options[f"model.layers.{i // 4}.mlp.p{i % 4}"] = LayerOptions(
            params=params, costs=rng.uniform(1, 2) * np.array([32.0, 16, 6, 3, 1.5, 1]), bits=per_param * params)
    return BitBudget(options, target_bits=target, layer_of=lambda p: layer_prefix(p, "model.layers"),
                     names=[f"s{c}" for c in range(6)])


@pytest.mark.parametrize("drift", [0.9, 1.0, 1.12])
def test_budget_closes_the_loop_on_realized_bits(drift):
    """Whatever the linears really store (here `drift` × the estimate), the average lands on the target."""
    budget = _budget()
    for path, opt in budget.options.items():
        c = budget.choice_for(path)
        budget.record(path, c, drift * opt.bits[c])
    summary = budget.summary()
    assert abs(summary["realized_bits"] - 3.2) < 0.02, summary
    assert sum(v["linears"] for v in summary["settings"].values()) == 40
    assert "3.200" in describe(summary) or "3.19" in describe(summary) or "3.20" in describe(summary)


def test_budget_plans_a_layer_once_from_the_layers_before_it():
    """The linears of one layer get the plan made when its first linear asked (order within a layer is free)."""
    a, b = _budget(), _budget()
    paths = list(a.options)
    for layer in range(10):
        group = paths[4 * layer: 4 * layer + 4]
        got_a = {p: a.choice_for(p) for p in group}
        got_b = {p: b.choice_for(p) for p in reversed(group)}
        assert got_a == got_b
        for p in group:
            a.record(p, got_a[p], a.options[p].bits[got_a[p]] * 1.05)
            b.record(p, got_b[p], b.options[p].bits[got_b[p]] * 1.05)


def test_budget_refuses_a_target_below_the_fewest_bits():
    with pytest.raises(QCompilerError, match="below the fewest bits"):
        _budget(target=2.0)


def test_weighted_error_is_the_fisher_weighted_output_error():
    torch.manual_seed(0)
    N, K, T = 5, 7, 50
    delta, x, fisher = torch.randn(N, K), torch.randn(T, K), torch.rand(N)
    H = 2.0 * x.T @ x  # one window: H = 2/n Σ x xᵀ with n = 1
    expected = 2.0 * sum(float(fisher[n] * ((x @ delta[n]) ** 2).sum()) for n in range(N))
    assert weighted_error(delta, H, fisher) == pytest.approx(expected, rel=1e-5)


def test_output_fisher_is_the_squared_output_gradient(tiny_dirs):
    """F of one linear equals Σ_t (∂ℓ/∂y_t)² computed by hand with autograd on that linear's output."""
    from transformers import AutoModelForCausalLM

    from qcompiler.models.families import family_for, get_module

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs("llama")).eval()
    family = family_for(model.config)
    windows = [torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fisher = output_fisher(model, family, windows, progress=False)
    path = "model.layers.1.mlp.down_proj"
    linear = get_module(model, path)
    expected = torch.zeros(linear.out_features)
    for w in windows:
        kept = {}

        def keep(_module, _args, out):
            out.retain_grad()
            kept["y"] = out

        handle = linear.register_forward_hook(keep)
        logits = model(input_ids=w, use_cache=False).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").backward()
        handle.remove()
        expected += kept["y"].grad.reshape(-1, linear.out_features).square().sum(0)
        model.zero_grad(set_to_none=True)
    assert torch.allclose(fisher[path], expected, rtol=1e-4, atol=1e-12)
    assert set(fisher) >= {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert all(p.requires_grad for p in model.parameters())  # the probe restores what it froze


def test_target_bits_export(tiny_dirs, tmp_path, text_file, capsys):
    """`--target-bits` exports run in ONNX Runtime (the export validates), record the allocation and each linear's
    setting, land on the target within the tiny model's granularity, and more bits cost less error."""
    from qcompiler.cli import main
    from qcompiler.tools.inspect import allocation_summary

    records = {}
    for target in (2.75, 4.0):
        out = tmp_path / f"tb{target}"
        assert main(["export", str(tiny_dirs("llama")), "--method", "spqr", "--target-bits", str(target),
                     "--calibration", str(text_file), "--nsamples", "4", "--seqlen", "64", "-o", str(out), "-q"]) == 0
        record = json.loads((out / "quant_config.json").read_text())
        records[target] = record
        names = {c.name for c in MENU}
        assert {layer["setting"] for layer in record["layers"].values()} <= names
        assert record["allocation"]["target_bits"] == target
        # the tiny model's 14 linears of 2-12k parameters: one linear's change of setting moves the average by
        # 0.1-0.5 bits, and its last layer is a sixth of the budget (the 30-layer models land within 0.01:
        # bench/results/pareto-*.md; the closed loop at that scale: test_budget_closes_the_loop_on_realized_bits)
        assert abs(record["avg_bits"] - target) < 0.3
        assert record["allocation"]["realized_bits"] == pytest.approx(record["avg_bits"])
        assert record["validation"]["passed"]
        assert "--target-bits" in allocation_summary(out)
    err = {t: np.mean([layer["rel_error"] for layer in r["layers"].values()]) for t, r in records.items()}
    assert err[4.0] < err[2.75]
    assert records[2.75]["allocation"]["probe"] == records[4.0]["allocation"]["probe"] | {
        "seconds": records[2.75]["allocation"]["probe"]["seconds"]}  # the probe does not depend on the target

    # --sensitivity: the 4.0 export again on the 2.75 export's probe gives the same allocation without probing
    out = tmp_path / "tb4-reused"
    assert main(["export", str(tiny_dirs("llama")), "--method", "spqr", "--target-bits", "4.0",
                 "--sensitivity", str(tmp_path / "tb2.75"), "--calibration", str(text_file), "--nsamples", "4",
                 "--seqlen", "64", "-o", str(out), "-q"]) == 0
    reused = json.loads((out / "quant_config.json").read_text())
    assert reused["allocation"]["probe_from"] == str(tmp_path / "tb2.75" / "quant_config.json")
    assert reused["allocation"]["probe_seconds"] == {}
    assert {p: layer["setting"] for p, layer in reused["layers"].items()} == \
        {p: layer["setting"] for p, layer in records[4.0]["layers"].items()}
    assert reused["avg_bits"] == records[4.0]["avg_bits"]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "1"], "another calibration"),             # other probe windows
    (["--sensitivity", "NOWHERE"], "no quant_config.json there"),
    (["--percdamp", "0.5"], "another menu of settings"),  # the settings the costs were measured with
])
def test_sensitivity_refuses_a_probe_of_something_else(tiny_dirs, tmp_path, text_file, capsys, flags, message):
    """A reused probe must have been measured on the same weights, probe windows and settings: else a one-line
    error and no output folder."""
    from qcompiler.cli import main

    common = ["--method", "spqr", "--target-bits", "3", "--calibration", str(text_file), "--nsamples", "2",
              "--seqlen", "32", "-q"]
    first = tmp_path / "first"
    assert main(["export", str(tiny_dirs("llama")), *common, "-o", str(first)]) == 0
    out = tmp_path / "second"
    flags = [f.replace("NOWHERE", str(tmp_path / "nowhere")) for f in flags]
    if "--sensitivity" not in flags:
        flags = [*flags, "--sensitivity", str(first)]
    capsys.readouterr()
    assert main(["export", str(tiny_dirs("llama")), *common, *flags, "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[-1]
    assert not out.exists()
    with pytest.raises(Exception, match="give --target-bits too"):
        from qcompiler.quantize.methods.spqr import SpQRConfig
        SpQRConfig(sensitivity=str(first))


def test_target_bits_below_the_menu_is_one_line_error(tiny_dirs, tmp_path, text_file, capsys):
    from qcompiler.cli import main

    out = tmp_path / "out"
    assert main(["export", str(tiny_dirs("llama")), "--method", "spqr", "--target-bits", "2.05",
                 "--calibration", str(text_file), "--nsamples", "2", "--seqlen", "32", "-o", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "below the fewest bits" in err[-1]
    assert not out.exists()
