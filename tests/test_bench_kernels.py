"""bench/kernels.py on tiny shapes: every variant builds, runs and computes what fp32 MatMul computes (up to its
quantization), and the table holds one row per (shape, batch, variant)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

@pytest.fixture(scope="module")
def kernels():
    from bench import kernels

    return kernels

def test_matmulnbits_variant_approximates_the_fp32_matmul(kernels):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 48)) * 0.02).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = kernels.session(kernels.build("fp32", 64, 48, w), 1).run(None, {"X": x})[0]
    np.testing.assert_allclose(ref, x @ w, rtol=1e-5, atol=1e-5)
    for variant in ("nbits-a0", "nbits-a4"):
        model = kernels.build(variant, 64, 48, w)
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
        y = kernels.session(model, 1).run(None, {"X": x})[0]
        assert np.abs(y - ref).max() < 0.15 * np.abs(ref).max()  # 4-bit RTN of the same weight
    spqr = kernels.build("spqr-w3", 64, 48, w)
    assert spqr.graph.node[0].op_type == "SpQRMatMul"

def test_main_writes_one_row_per_case(kernels, tmp_path):
    out = tmp_path / "k.md"
    assert kernels.main(["--shapes", "64x48,96x32", "--batches", "1,3", "--variants", "fp32,spqr-w4,nbits-a0",
                         "--repeat", "1", "--number", "2", "--threads", "1", "-o", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 3 and all(r["seconds"] > 0 for r in rows)
    table = out.read_text()
    assert table.count("| 64x48 |") == 6 and "| 96x32 | 3 | fp32 |" in table
    with pytest.raises(SystemExit):
        kernels.main(["--variants", "fp64"])

def test_variants_are_timed_in_turn_each_round(kernels):
    calls: list[str] = []
    def run(name: str, seconds: float):
        def call():
            calls.append(name)
            time.sleep(seconds)
        return call
    t = kernels.time_interleaved({"a": run("a", 0.002), "b": run("b", 0.0)}, repeat=3, number=2)
    assert calls == ["a", "a", "b", "b"] * 3  # round by round, not all of a then all of b
    assert t["a"] >= 0.002 > t["b"]
