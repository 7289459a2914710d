"""CUDA kernels of `qcompiler::SpQRMatMul` against the NumPy reference `SpQRWeight.matmul`, on three backends:

- `cuda` (marker `gpu`): through ONNX Runtime's CUDA execution provider, where it starts (`onnxruntime-gpu`, a GPU)
  and the op library was built with its CUDA kernel (nvcc at build time); skipped everywhere else. The sessions are
  created with ORT's CPU fallback disabled, so a node that the CUDA kernel does not take fails the session instead of
  silently running on the CPU kernel.
- `direct` (marker `gpu`): the same launcher built by nvcc for the GPU at hand and called with PyTorch's device buffers
  (tests/cuda_direct.py), where PyTorch sees a GPU and nvcc is found: no onnxruntime-gpu or CUDA op-library build
  needed. Run on a GPU machine with `QCOMPILER_REQUIRE_GPU=1 pytest -m gpu tests/test_spqr_matmul_cuda.py`: the
  variable turns a skipped `direct` case into an error (`QCOMPILER_REQUIRE_CUDA_EP=1` likewise for `cuda`).
- `emu`: the same device code compiled for the CPU under the CUDA emulation of custom_ops/emu (tests/cuda_emu.py),
  launched directly (not through ORT), wherever a C++ compiler is. It checks indexing, decoding, barriers and warp
  collectives, not speed, and not the ORT binding (spqr_matmul_cuda.cc).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from tests.helpers import assert_matches_reference

from tests import cuda_direct
from tests import cuda_emu
from qcompiler.runtime import ops
from qcompiler.graph.format import SpQRWeight
from tests.builders import random_weight
from tests.builders import single_op_model
from tests.builders import has_cuda_kernel


def _cuda_ready() -> bool:
    """The CUDA EP really starts here (the onnxruntime-gpu wheel lists it even where CUDA or the GPU is missing, then
    falls back to the CPU at session creation) and the library has its CUDA kernel."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if "CUDAExecutionProvider" not in ort.get_available_providers() or not has_cuda_kernel():
            return False
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
                                  ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in sess.get_providers()
    except (ImportError, FileNotFoundError):
        return False


_READY = _cuda_ready()
_DIRECT = cuda_direct.ready()
if not _READY and os.environ.get("QCOMPILER_REQUIRE_CUDA_EP") == "1":  # on a GPU machine: fail instead of skipping
    raise RuntimeError("QCOMPILER_REQUIRE_CUDA_EP=1 but ONNX Runtime's CUDA EP does not start or the op library has no "
                       "CUDA kernel")
if not _DIRECT and os.environ.get("QCOMPILER_REQUIRE_GPU") == "1":
    raise RuntimeError("QCOMPILER_REQUIRE_GPU=1 but PyTorch sees no CUDA device or nvcc is not found")
BACKENDS = [
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not _READY, reason="needs ONNX Runtime's CUDA EP and an op library built with CUDA")]),
    pytest.param("direct", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not _DIRECT, reason="needs PyTorch with a CUDA device and nvcc")]),
    pytest.param("emu", marks=pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")),
]


def _cuda_session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ops.session(model.SerializeToString(), providers=["CUDAExecutionProvider"], sess_options=so)


@pytest.fixture(scope="session")
def emulated_kernel():
    return cuda_emu.EmulatedKernel(cuda_emu.build())


@pytest.fixture(scope="session")
def direct_kernel():
    return cuda_direct.DirectKernel(cuda_direct.build(cuda_direct.gpu_arch()))


@pytest.fixture(params=BACKENDS)
def run(request):
    """`run(weight, x, bias_dtype=None) -> y` on the backend under test."""
    if request.param == "emu":
        return request.getfixturevalue("emulated_kernel").run
    if request.param == "direct":
        return request.getfixturevalue("direct_kernel").run

    def on_cuda(weight, x, bias_dtype=None, activation=""):
        model = single_op_model(weight, x_dtype=x.dtype, x_shape=[f"d{i}" for i in range(x.ndim - 1)] + [None],
                                bias_dtype=bias_dtype, activation=activation)
        return _cuda_session(model).run(None, {"X": x})[0]

    return on_cuda


def _check(run, weight: SpQRWeight, x: np.ndarray, **kw) -> None:
    """`run` against the reference, once per launch shape the launcher chooses between by the device's SM count (so
    that the emulated cases, whose small N would only see some of them, see all), unless the test forces one: at
    M <= 8 (the decode GEMV) each rows per warp its tile offers (QCOMPILER_CUDA_GEMV_ROWS), with fp16 X from 9 rows
    (the prefill kernel) both tiles (QCOMPILER_CUDA_PREFILL_TILE)."""
    M = int(np.prod(x.shape[:-1]))
    if M <= 8:
        variable = "QCOMPILER_CUDA_GEMV_ROWS"
        values = tuple(map(str, cuda_emu.GEMV_ROWS[next(t for t in (1, 2, 4, 8) if M <= t)]))
    elif x.dtype == np.float16:
        variable, values = "QCOMPILER_CUDA_PREFILL_TILE", ("64", "128")
    else:
        variable, values = None, ()
    if variable is None or os.environ.get(variable):
        assert_matches_reference(weight, x, run(weight, x, **kw), kw.get("activation", ""))
        return
    for value in values:
        os.environ[variable] = value
        try:
            assert_matches_reference(weight, x, run(weight, x, **kw), kw.get("activation", ""))
        finally:
            del os.environ[variable]


def _x(shape, dtype=np.float32, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# K=600 / 584: a padded last chunk and (β1=16) a ragged group count; K=100 with β1=32: a ragged last group.
# M: the decode kernel's row tiles 1, 4 (3 rows) and 8, and M=64 (fp16: the prefill kernel; fp32: the row kernel).
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,K", [(16, 600), (16, 584), (32, 100), (64, 576)])
@pytest.mark.parametrize("stats", [(3, 16), (3, 32), (0, 16), (2, 8)])
@pytest.mark.parametrize("M", [1, 3, 8, 64])
def test_matches_reference(run, bits, group_size, K, stats, M):
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=stats[0], stat_group_size=stats[1],
                      outlier_rate=0.02, permute=True, bias=True, seed=bits * 100 + group_size + K + M)
    _check(run, w, _x((M, K), seed=M))
    _check(run, w, _x((M, K), np.float16, seed=M))


# The decode kernel stages X in slabs of 1024 columns: K=2100 takes three (the last ragged), K=1056 two.
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,K", [(16, 2100), (64, 1056)])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_several_slabs(run, bits, group_size, K, M):
    w = random_weight(N=40, K=K, bits=bits, group_size=group_size, stat_bits=3, stat_group_size=16,
                      outlier_rate=0.02, permute=True, bias=True, seed=bits + K + M)
    _check(run, w, _x((M, K), seed=M))
    _check(run, w, _x((M, K), np.float16, seed=M))


# Long rows: at M=1 all of X is staged once (K=11008: 52 KB as fp32 with the sums, above the 48 KB default, so the
# launcher raises the kernel's limit where the budget allows; on the emulated device's (49 KB) it does not fit and X
# goes in slabs, from a copy of X's rows in shared memory when those fit, else from global memory).
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_long_rows(run, M, dtype):
    w = random_weight(N=20, K=11008, bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.01,
                      permute=True, bias=True, seed=M)
    _check(run, w, _x((M, 11008), dtype, seed=M))


# The decode kernel's three ways to hold X (QCOMPILER_CUDA_GEMV_X forces one where it fits): all of K staged once
# (resident: by default wherever it fits), per 1024-column slab gathered from global memory (slabs), per slab from a
# copy of X's rows in shared memory (rows: needs perm). K=2100: three slabs, the last ragged; M=5: the 8-row tile.
@pytest.mark.parametrize("mode", ["resident", "slabs", "rows"])
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("group_size", [16, 64])
@pytest.mark.parametrize("permute", [False, True])
def test_x_staging_modes(run, monkeypatch, mode, M, group_size, permute):
    monkeypatch.setenv("QCOMPILER_CUDA_GEMV_X", mode)
    w = random_weight(N=40, K=2100, bits=3, group_size=group_size, stat_bits=3, stat_group_size=16,
                      outlier_rate=0.02, permute=permute, bias=True, seed=M + group_size)
    _check(run, w, _x((M, 2100), seed=M))
    _check(run, w, _x((M, 2100), np.float16, seed=M))


# The decode kernel's rows per warp (QCOMPILER_CUDA_GEMV_ROWS forces one its tile offers: 4, 2 or 1 at M = 1; 4 or 2
# at M = 2; 2 or 1 at M = 3..8). N = 37: a last warp with fewer rows than R, and warps past N. Statistics: 3-bit over
# 16 rows, 2-bit over 8 (a warp's rows in one second-level group), 4-bit over 6 (a warp's rows in two), fp16.
@pytest.mark.parametrize("rows", [4, 2, 1])
@pytest.mark.parametrize("M", [1, 2, 3, 6])
@pytest.mark.parametrize("stats", [(3, 16), (2, 8), (4, 6), (0, 16)])
def test_gemv_rows_per_warp(run, monkeypatch, rows, M, stats):
    monkeypatch.setenv("QCOMPILER_CUDA_GEMV_ROWS", str(rows))
    w = random_weight(N=37, K=1100, bits=3, group_size=16, stat_bits=stats[0], stat_group_size=stats[1],
                      outlier_rate=0.02, permute=True, bias=True, seed=M + rows)
    _check(run, w, _x((M, 1100), np.float16, seed=M))


# The launcher's rows per warp: the most its tile offers where that fills the GPU (N = 11008 on 132 SMs), fewer where
# it would leave SMs idle or under-occupied (N = 4096: 128 blocks of 4 rows per warp; N = 576), the most where the SM
# count is unknown. An estimate of its cost (docs/kernels.md), checked here as a function.
@pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")
def test_gemv_rows_choice(emulated_kernel):
    choose = emulated_kernel.gemv_rows_per_warp
    assert [choose(1, n, 132) for n in (576, 1536, 4096, 11008)] == [1, 1, 2, 4]
    assert [choose(m, 11008, 132) for m in (2, 4, 8)] == [4, 2, 2]
    assert [choose(m, 576, 132) for m in (2, 4)] == [2, 1]
    assert choose(1, 4096, 0) == 4 and choose(5, 4096, 0) == 2  # SM count unknown: the most
    assert choose(1, 4096, 16) == 4  # a 16-SM part (Jetson AGX Orin) is filled by 4 rows per warp


# The prefill kernel's tiles (QCOMPILER_CUDA_PREFILL_TILE forces one): M = 200 spans two 128-row tiles (the second
# ragged) and four 64-row ones; N = 150 leaves the last tile of either width ragged; outliers and permutation on.
@pytest.mark.parametrize("tile", ["64", "128"])
@pytest.mark.parametrize("bits,group_size", [(3, 16), (2, 64), (4, 50)])
def test_prefill_tiles(run, monkeypatch, tile, bits, group_size):
    monkeypatch.setenv("QCOMPILER_CUDA_PREFILL_TILE", tile)
    w = random_weight(N=150, K=200, bits=bits, group_size=group_size, stat_bits=3, stat_group_size=16,
                      outlier_rate=0.03, permute=True, bias=True, seed=bits)
    _check(run, w, _x((200, 200), np.float16, seed=bits))


# The launcher's prefill tile: 64 x 64 up to 64 rows of X; 128 x 128 beyond, where its grid gives every SM a block
# (else the smaller tile's more blocks); the larger where the SM count is unknown.
@pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")
def test_prefill_tile_choice(emulated_kernel):
    large = emulated_kernel.prefill_uses_large_tile
    assert not large(64, 11008, 16) and large(65, 11008, 16)
    assert not large(65, 11008, 132)  # 86 blocks of 128 x 128 for 132 SMs
    assert large(200, 11008, 132) and large(512, 11008, 132)
    assert not large(512, 4096, 132)  # 4 x 32 = 128 blocks
    assert large(1024, 4096, 132) and large(512, 4096, 16) and large(512, 4096, 0)


# Group sizes that the decode kernel does not take (not 16 or a multiple of 32): the row kernel, except fp16 X from
# 9 rows on (M=40) with β1 >= 32: the prefill kernel, whose 32-column chunks then meet a group boundary inside (β1=50:
# not even at a multiple of 4).
@pytest.mark.parametrize("group_size,K", [(8, 200), (48, 300), (50, 300)])
@pytest.mark.parametrize("M", [1, 8, 40])
def test_other_group_sizes(run, group_size, K, M):
    w = random_weight(N=36, K=K, bits=3, group_size=group_size, stat_bits=3, stat_group_size=16, outlier_rate=0.02,
                      permute=True, bias=True, seed=group_size + M)
    _check(run, w, _x((M, K), seed=M))
    _check(run, w, _x((M, K), np.float16, seed=M))


@pytest.mark.parametrize("outliers", [0.0, 0.05])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_optional_inputs(run, outliers, permute, bias):
    w = random_weight(N=48, K=96, bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=outliers,
                      permute=permute, bias=bias, seed=7)
    _check(run, w, _x((5, 96)))
    _check(run, w, _x((2, 3, 96), np.float16))


def test_fp16_bias_with_fp32_x(run):
    w = random_weight(N=40, K=64, bits=4, group_size=16, bias=True, seed=3)
    _check(run, w, _x((4, 64)), bias_dtype=np.float16)


def test_zero_rows_give_an_empty_output(run):
    w = random_weight(N=32, K=64, bits=3, group_size=16, seed=4)
    assert run(w, np.zeros((0, 64), np.float32)).shape == (0, 32)


def test_large_layer(run):
    # A SmolLM2-sized MLP weight at the 3-bit preset (1 % outliers), decode and prefill batch sizes.
    w = random_weight(N=1536, K=576, bits=3, group_size=16, stat_bits=3, stat_group_size=32, outlier_rate=0.01,
                      permute=True, seed=11)
    for M in (1, 16, 512):
        _check(run, w, _x((M, 576), np.float16, seed=M))
