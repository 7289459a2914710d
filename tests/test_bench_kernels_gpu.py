"""bench/kernels_gpu.py's models, on the CPU (the timing itself needs a GPU): each variant holds `copies` distinct
layer instances on one X, and every instance computes the layer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qcompiler.runtime import ops


@pytest.fixture(scope="module")
def bench():
    from bench import kernels_gpu

    return kernels_gpu


@pytest.mark.parametrize("variant", ["fp16", "spqr-w3", "spqr-w4", "nbits"])
def test_copies_are_distinct_initializers_of_one_layer(bench, variant):
    K, N, copies = 64, 48, 3
    w16 = (np.random.default_rng(0).standard_normal((K, N)) / 8).astype(np.float16)
    one, many = bench.build(variant, K, N, 1, w16), bench.build(variant, K, N, copies, w16)
    assert len(many.graph.node) == copies * len(one.graph.node)
    assert [o.name for o in many.graph.output] == [f"Y{i}" for i in range(copies)]
    names = [t.name for t in many.graph.initializer]
    assert len(set(names)) == len(names)
    assert bench.weight_bytes(many) == copies * bench.weight_bytes(one)


@pytest.mark.parametrize("variant", ["fp16", "spqr-w3"])
def test_every_copy_computes_the_layer(bench, variant):
    K, N = 96, 40
    w16 = (np.random.default_rng(1).standard_normal((K, N)) / 8).astype(np.float16)
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float16)
    ys = ops.session(bench.build(variant, K, N, 3, w16).SerializeToString()).run(None, {"X": x})
    if variant == "fp16":
        ref = (x.astype(np.float32) @ w16.astype(np.float32))
    else:
        from tests.builders import random_weight

        ref = random_weight(N=N, K=K, seed=K + N, **bench.SPQR_PRESETS[variant]).matmul(x).astype(np.float32)
    for y in ys:
        np.testing.assert_allclose(y.astype(np.float32), ref, rtol=0, atol=2e-3 * np.abs(ref).max())


def test_copies_cover_the_stream_size(bench):
    assert bench.copies_for(22_000_000, 512) == 24
    assert bench.copies_for(600_000_000, 512) == 1


VARIABLES = ("QCOMPILER_CUDA_GEMV_X", "QCOMPILER_CUDA_GEMV_ROWS", "QCOMPILER_CUDA_PREFILL_TILE")


def test_main_prints_a_row_per_variant_and_launch_setting(bench, monkeypatch, tmp_path):
    """The table and JSON code path, with the GPU parts replaced (a session that only records the launch
    settings it was created and run under, a fixed copy bandwidth): every variant and, for SpQR, every --gemv-x mode
    and --gemv-rows count at batch <= 8 and every --prefill-tile from 9 gets a row with numbers, and a setting is in
    the environment only while its session is made and timed."""
    import onnxruntime as ort

    made, timed = [], []

    class FakeRun:
        def __init__(self, model, x, *, cuda_graph):
            made.append((model.graph.node[0].op_type, x.shape[0], *map(os.environ.get, VARIABLES)))

        def __call__(self):  # plain runs read the variables at each launch: still set while timed
            timed.append(tuple(map(os.environ.get, VARIABLES)))

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(bench, "GpuRun", FakeRun)
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda: 1000.0)
    for v in VARIABLES:
        monkeypatch.delenv(v, raising=False)
    out = tmp_path / "k.md"
    assert bench.main(["--shapes", "64x48", "--batches", "1,16", "--variants", "fp16,spqr-w3", "--stream-mb", "0.01",
                       "--repeat", "1", "--number", "1", "--gemv-x", "default,slabs", "--gemv-rows", "2",
                       "--prefill-tile", "128", "-o", str(out)]) == 0
    assert made == [("MatMul", 1, None, None, None), ("SpQRMatMul", 1, None, None, None),
                    ("SpQRMatMul", 1, "slabs", None, None), ("SpQRMatMul", 1, None, "2", None),
                    ("MatMul", 16, None, None, None), ("SpQRMatMul", 16, None, None, None),
                    ("SpQRMatMul", 16, None, None, "128")]
    assert set(timed) == {(None, None, None), ("slabs", None, None), (None, "2", None), (None, None, "128")}
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 64x48")]
    assert [r.split(" | ")[2] for r in rows] == ["fp16", "spqr-w3", "spqr-w3 [x=slabs]", "spqr-w3 [rows=2]", "fp16",
                                                 "spqr-w3", "spqr-w3 [tile=128]"]
    assert all("failed" not in r and r.count("|") == 9 for r in rows)
    assert not any(v in os.environ for v in VARIABLES)


@pytest.mark.parametrize("variant", ["spqr-w3", "spqr-w4"])
def test_direct_bench_counts_the_bytes_the_ort_bench_counts(bench, variant):
    """bench/kernels_cuda_direct.py (no ONNX Runtime) reports GB/s over the same weight bytes as this benchmark's
    models hold as initializers, so the two tables compare."""
    from tests.builders import random_weight

    K, N = 256, 96
    w16 = np.zeros((K, N), np.float16)
    from bench import kernels_cuda_direct as direct

    w = random_weight(N=N, K=K, seed=K + N, **direct.SPQR_PRESETS[variant])
    assert direct.weight_bytes(w) == bench.weight_bytes(bench.build(variant, K, N, 1, w16)) > 0
