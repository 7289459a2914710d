"""CPU kernel of `qcompiler::SpQRMatMul` (libqcompiler_ops.so) against the NumPy reference `SpQRWeight.matmul`."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from tests.helpers import assert_matches_reference
from onnx import TensorProto, helper

from qcompiler.runtime import ops
from qcompiler.graph.format import DOMAIN, OPSET_VERSION, SpQRWeight
from tests.builders import random_weight
from qcompiler.graph.onnx_op import spqr_node
from tests.builders import single_op_model

_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _run(weight: SpQRWeight, x: np.ndarray, **model_kw) -> np.ndarray:
    shape = [f"d{i}" for i in range(x.ndim - 1)] + [None]
    model = single_op_model(weight, x_dtype=x.dtype, x_shape=shape, **model_kw)
    return ops.session(model.SerializeToString()).run(None, {"X": x})[0]


def _check(weight: SpQRWeight, x: np.ndarray, **model_kw) -> None:
    assert_matches_reference(weight, x, _run(weight, x, **model_kw))


def _x(shape, dtype=np.float32, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# --------------------------------------------------------------------------------------------- numerics vs reference
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128])
def test_bits_and_group_sizes(bits, group_size):
    # K=576: β1=128 leaves a ragged last group of 64; outliers/perm/bias vary with the case.
    case = bits * 7 + group_size
    w = random_weight(N=40, K=576, bits=bits, group_size=group_size, outlier_rate=0.01 * (case % 2),
                      permute=bool(case % 3), bias=bool(case % 5), seed=case)
    _check(w, _x((2, 3, 576), seed=case))


@pytest.mark.parametrize("stat_bits", [0, 2, 3, 4])
@pytest.mark.parametrize("stat_group_size", [16, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_bilevel_stats_ragged(stat_bits, stat_group_size, bits):
    # K=100 is not a multiple of 32 (padded last chunk) nor of β1=16; N=40 is ragged for β2 and for the packed stats.
    w = random_weight(N=40, K=100, bits=bits, group_size=16, stat_bits=stat_bits, stat_group_size=stat_group_size,
                      outlier_rate=0.02, permute=True, bias=True, seed=stat_bits * 10 + stat_group_size + bits)
    _check(w, _x((4, 100)))


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stat_bits", [0, 3])
def test_optional_inputs(outliers, permute, bias, stat_bits):
    w = random_weight(N=48, K=160, bits=3, group_size=32, stat_bits=stat_bits, stat_group_size=16,
                      outlier_rate=0.05 if outliers else 0.0, permute=permute, bias=bias, seed=3)
    assert (w.nnz > 0) == outliers
    _check(w, _x((1, 1, 160)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lead", [(1, 1), (3,), (2, 5), (1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_x_dtypes_and_batch_shapes(dtype, lead):
    w = random_weight(N=40, K=96, bits=4, group_size=32, stat_bits=3, stat_group_size=16, outlier_rate=0.02,
                      permute=True, bias=True, seed=7)
    _check(w, _x(lead + (96,), dtype))


@pytest.mark.parametrize("x_dtype,bias_dtype", [(np.float32, np.float16), (np.float16, np.float32)])
def test_bias_dtype_independent_of_x(x_dtype, bias_dtype):
    w = random_weight(N=24, K=64, bits=4, group_size=16, bias=True, seed=11)
    w.bias = w.bias.astype(np.float16).astype(np.float32)  # what a float16 bias input can represent
    _check(w, _x((2, 64), x_dtype), bias_dtype=bias_dtype)


@pytest.mark.parametrize("N", [1, 3, 37, 130])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_row_blocks_with_ragged_tails(N, M):
    # The kernel decodes W in blocks of 4 rows and takes dot products 8 lanes at a time: N not a multiple of 4 leaves
    # a partial row block, K=99 a scalar tail of 3; M=70 gives the many-rows task split.
    w = random_weight(N=N, K=99, bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.03,
                      permute=True, bias=True, seed=N + M)
    _check(w, _x((M, 99), seed=M))


@pytest.mark.parametrize("isa", ["auto", "avx512-rows", "portable"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 32, 48])
@pytest.mark.parametrize("M", [1, 2, 7])
def test_gemv_kernels_per_isa(isa, bits, group_size, M, monkeypatch):
    # The GEMV path has a pre-packed AVX-512 kernel (group_size 16 or a multiple of 32, constant weights), an
    # AVX-512 row kernel on the stored layout (group_size % 16 == 0; QCOMPILER_CPU_ISA=avx512-rows) and a portable
    # one (QCOMPILER_CPU_ISA=portable), each chosen at run time; K=600 leaves a ragged group and a padded chunk, N=70 a ragged
    # 32-row task, β2=8 decodes statistics 8 rows at a time.
    monkeypatch.setenv("QCOMPILER_CPU_ISA", isa)
    w = random_weight(N=70, K=600, bits=bits, group_size=group_size, stat_bits=3, stat_group_size=8,
                      outlier_rate=0.02, permute=True, bias=True, seed=bits * 100 + group_size + M)
    _check(w, _x((M, 600), seed=M))


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _has_avx512() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags()


@pytest.mark.skipif(not _has_avx512(), reason="the packed GEMV kernel needs AVX-512 (F, BW, VL, DQ)")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # (8-bit codes: the AVX2 kernels serve the AVX-512 table)
@pytest.mark.parametrize("group_size,K", [(16, 600), (16, 584), (32, 600), (64, 600), (128, 576)])
@pytest.mark.parametrize("stats", ["coded-b16", "coded-b32", "coded-b48", "split-b8", "fp16"])
@pytest.mark.parametrize("M", [1, 2, 7])
def test_packed_gemv_path(bits, group_size, K, stats, M, monkeypatch):
    # QCOMPILER_CPU_REQUIRE_PACKED=1 turns "the packed path was not taken" into an error, so these cases cannot pass
    # on another path. K=600/584: a padded chunk and, for β1=16, an odd group count (the last chunk's second half is
    # padding); K=576 with β1=128: a ragged last group. Statistics: quantized with β2 a multiple of the 16-row block
    # (codes unpacked in the kernel; β2=32: two blocks share a row of second-level values, β2=48: not a power-of-two
    # number of blocks, a row per block), β2=8 (decoded per row at packing time) and fp16; N=70: a ragged last block.
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    stat_bits, stat_group_size = {"coded-b16": (3, 16), "coded-b32": (2, 32), "coded-b48": (3, 48),
                                  "split-b8": (3, 8), "fp16": (0, 16)}[stats]
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=stat_bits,
                      stat_group_size=stat_group_size, outlier_rate=0.02, permute=True, bias=True,
                      seed=bits * 1000 + group_size + K + M)
    _check(w, _x((M, K), seed=M))
    _check(w, _x((M, K), np.float16, seed=M))


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="the AVX2 packed GEMV needs AVX2 + FMA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,K", [(16, 600), (32, 600), (128, 576)])
@pytest.mark.parametrize("stats", ["coded-b16", "coded-b32", "split-b8", "fp16"])
@pytest.mark.parametrize("M", [1, 4, 7, 20])
def test_avx2_packed_gemv_path(bits, group_size, K, stats, M, monkeypatch):
    # What a CPU without AVX-512 runs (QCOMPILER_CPU_ISA=avx2 keeps all AVX-512 code out): the packed GEMV on two 8-row
    # halves per block, slices of at most 4 rows of X (M=7: 4 + 3; M=20, prefill sizes: 5 x 4). Every bit width has a field
    # ending at bit 31 (converted after a one-bit shift, AVX2 having no unsigned conversion); 8-bit: 4 codes a word.
    monkeypatch.setenv("QCOMPILER_CPU_ISA", "avx2")
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    stat_bits, stat_group_size = {"coded-b16": (3, 16), "coded-b32": (3, 32), "split-b8": (3, 8),
                                  "fp16": (0, 16)}[stats]
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=stat_bits,
                      stat_group_size=stat_group_size, outlier_rate=0.02, permute=True, bias=True,
                      seed=bits * 1000 + group_size + K + M + 7)
    _check(w, _x((M, K), seed=M))
    _check(w, _x((M, K), np.float16, seed=M))


def test_packed_gemv_path_is_required_when_asked(monkeypatch):
    # Guards the test above: a node the packed kernel cannot take (β1=48) fails under QCOMPILER_CPU_REQUIRE_PACKED.
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    w = random_weight(N=20, K=96, bits=3, group_size=48, stat_bits=3, stat_group_size=16, seed=0)
    with pytest.raises(Exception, match="packed path is not available"):
        _run(w, _x((1, 96)))


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_kept_binding_is_taken_run_after_run(accuracy_level, monkeypatch):
    # A node whose inputs but X are initializers binds them on its first call and keeps that binding; under
    # QCOMPILER_CPU_REQUIRE_KEPT_BINDING=1 a later call that does not take it fails. ONNX Runtime wraps the same
    # initializer in a fresh OrtValue each run, so runs of varying M (plain and through an IOBinding, as the
    # generator's decode steps) hold the kept binding to the tensors' data, not to those wrappers.
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_KEPT_BINDING", "1")
    w = random_weight(N=70, K=600, bits=4, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.02,
                      permute=True, bias=True, seed=11)
    model = single_op_model(w, x_shape=["m", None], accuracy_level=accuracy_level)
    sess = ops.session(model.SerializeToString())
    for M in (1, 5, 1, 40, 1, 1):
        x = _x((M, 600), seed=M)
        first_call = ops.session(model.SerializeToString()).run(None, {"X": x})[0]  # a fresh node: full binding
        if accuracy_level == 0:
            assert_matches_reference(w, x, first_call)
        np.testing.assert_array_equal(sess.run(None, {"X": x})[0], first_call)
        binding = sess.io_binding()
        binding.bind_cpu_input("X", x)
        binding.bind_output("Y", "cpu")
        sess.run_with_iobinding(binding)
        np.testing.assert_array_equal(binding.get_outputs()[0].numpy(), first_call)


@pytest.mark.parametrize("group_size", [12, 20])
@pytest.mark.parametrize("M", [1, 3])
def test_row_path_for_group_sizes_not_multiple_of_8(group_size, M):
    # The vectorized GEMV reads codes 8 at a time within a group; other group sizes take the row-decode fallback.
    w = random_weight(N=45, K=130, bits=3, group_size=group_size, stat_bits=3, stat_group_size=16,
                      outlier_rate=0.03, permute=True, bias=True, seed=group_size + M)
    _check(w, _x((M, 130), seed=M))


@pytest.mark.parametrize("M", [7, 8, 13, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gemm_path_tiles_and_k_blocks(M, dtype):
    # M >= 8 takes the GEMM path: tiles of 16 W rows (N=37: a ragged last tile), micro-tiles of 6 X rows (ragged for
    # every M here), K in blocks of 256 (K=600: two full blocks and a ragged one). M=7 is the row path's largest M.
    w = random_weight(N=37, K=600, bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.02,
                      permute=True, bias=True, seed=M)
    _check(w, _x((M, 600), dtype, seed=M))


@pytest.mark.skipif(not _has_avx512(), reason="the packed prefill path needs AVX-512")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,stats", [(16, (3, 16)), (16, (0, 16)), (64, (3, 32)), (96, (2, 16))])
@pytest.mark.parametrize("M,dtype", [(16, np.float32), (45, np.float32), (33, np.float16)])
def test_packed_gemm_path(bits, group_size, stats, M, dtype, monkeypatch):
    # M >= 16 on initializer weights: blocks of 16 rows decoded per 128-column step (K=600: four steps and a ragged
    # one; group 96 spans steps, so a step can start inside a group), outliers added into the tile, X panels of
    # 12 rows (ragged for every M here), N=70 (a ragged last block), bias, permutation.
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    w = random_weight(N=70, K=600, bits=bits, group_size=group_size, stat_bits=stats[0], stat_group_size=stats[1],
                      outlier_rate=0.03, permute=True, bias=True, seed=bits * 10 + group_size + M)
    _check(w, _x((M, 600), dtype, seed=M))


def test_larger_layer_multithreaded():
    # Many row blocks across ORT's thread pool, prefill-like M.
    w = random_weight(N=512, K=1024, bits=3, group_size=128, stat_bits=3, stat_group_size=16, outlier_rate=0.005,
                      permute=True, bias=True, seed=5)
    _check(w, _x((1, 17, 1024)))


def test_kernel_is_not_trivially_zero():
    # Guards the tolerance checks above: a wrong weight must be caught.
    w = random_weight(N=16, K=64, bits=4, group_size=16, seed=2)
    y = _run(w, _x((1, 64)))
    w2 = random_weight(N=16, K=64, bits=4, group_size=16, seed=3)
    assert np.abs(y - w2.matmul(_x((1, 64)))).max() > 1e-2 * np.abs(y).max()


# ------------------------------------------------------------------------------------------- type/shape inference
def test_dynamic_batch_runs_with_different_batch_sizes():
    w = random_weight(N=40, K=64, bits=2, group_size=32, seed=4)
    sess = ops.session(single_op_model(w, x_shape=("batch", "seq", None)).SerializeToString())
    out = sess.get_outputs()[0]
    assert out.type == "tensor(float)" and out.shape == ["batch", "seq", 40]  # inferred by the op (Y has no shape)
    for shape in [(1, 1, 64), (4, 7, 64), (2, 0, 64)]:
        x = _x(shape)
        y = sess.run(None, {"X": x})[0]
        assert y.shape == shape[:-1] + (40,)
        np.testing.assert_allclose(y, w.matmul(x), rtol=0, atol=1e-4 * max(1.0, float(np.abs(y).max(initial=0))))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_inferred_type_and_shape_feed_standard_ops(dtype):
    """Y is an intermediate value with no value_info: ORT must infer its type and shape for the ops after it."""
    w = random_weight(N=40, K=64, bits=4, group_size=16, stat_bits=2, outlier_rate=0.02, bias=True, seed=6)
    node, inits = spqr_node(w, x="X", y="Y", prefix="layer", bias_dtype=dtype)
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["Y"], ["Z"]), helper.make_node("Shape", ["Y"], ["S"])],
        "g",
        [helper.make_tensor_value_info("X", _ONNX[np.dtype(dtype)], ["batch", 64])],
        [helper.make_tensor_value_info("Z", _ONNX[np.dtype(dtype)], None),
         helper.make_tensor_value_info("S", TensorProto.INT64, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)], ir_version=8)
    sess = ops.session(model.SerializeToString())
    # Z and S are declared without shape: ORT derives them from the shape/type the op inferred for Y.
    z_info, s_info = sess.get_outputs()
    assert z_info.type == ("tensor(float)" if dtype == np.float32 else "tensor(float16)")
    assert z_info.shape == ["batch", 40]
    assert s_info.shape == [2]
    x = _x((3, 64), dtype)
    z, s = sess.run(None, {"X": x})
    assert s.tolist() == [3, 40]
    ref = np.maximum(w.matmul(x).astype(np.float32), 0)
    np.testing.assert_allclose(z.astype(np.float32), ref, rtol=0, atol=2e-3 * float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------------------- errors
def _with_dynamic_last_dim(model: onnx.ModelProto) -> onnx.ModelProto:
    dim = model.graph.input[0].type.tensor_type.shape.dim[-1]
    dim.Clear()
    dim.dim_param = "k"
    return model


def test_x_last_dim_not_k_is_an_ort_error():
    w = random_weight(N=8, K=100, bits=4, group_size=32, seed=0)
    sess = ops.session(_with_dynamic_last_dim(single_op_model(w, x_shape=("m", None))).SerializeToString())
    with pytest.raises(Exception, match=r"SpQRMatMul node 'layer/SpQRMatMul'.*last dim must equal K=100"):
        sess.run(None, {"X": _x((2, 99))})


def test_missing_stats2_is_an_ort_error():
    w = random_weight(N=8, K=64, bits=4, group_size=32, stat_bits=3, seed=0)
    model = single_op_model(w, x_shape=("m", None))
    model.graph.node[0].input[4] = ""
    sess = ops.session(model.SerializeToString())
    with pytest.raises(Exception, match="stats2 is required when stat_bits > 0"):
        sess.run(None, {"X": _x((1, 64))})


def test_wrong_qweight_shape_is_an_ort_error():
    w = random_weight(N=8, K=64, bits=4, group_size=32, seed=0)
    w.bits = 3  # attribute no longer matches the packed rows (64 codes of 4 bits = 32 bytes, 3 bits needs 24)
    sess = ops.session(single_op_model(w, x_shape=("m", None)).SerializeToString())
    with pytest.raises(Exception, match=r"qweight has shape \[8, 32\], expected \[8, 24\]"):
        sess.run(None, {"X": _x((1, 64))})


def test_bad_outlier_index_is_an_ort_error():
    w = random_weight(N=8, K=64, bits=4, group_size=32, outlier_rate=0.1, seed=0)
    w.outlier_col_idx = w.outlier_col_idx.copy()
    w.outlier_col_idx[0] = 64
    sess = ops.session(single_op_model(w, x_shape=("m", None)).SerializeToString())
    with pytest.raises(Exception, match=r"outlier_col_idx\[0\]=64 is out of range for K=64"):
        sess.run(None, {"X": _x((1, 64))})


def test_index_inputs_fed_at_run_time_are_checked_on_every_call():
    # Initializer index inputs are validated once per session; a col_idx fed as a graph input must be checked on
    # each run (a valid first run must not switch the check off).
    w = random_weight(N=8, K=64, bits=4, group_size=32, outlier_rate=0.1, seed=0)
    model = single_op_model(w, x_shape=("m", None))
    name = next(i for i in model.graph.node[0].input if i.endswith("outlier_col_idx"))
    init = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.UINT16, [w.nnz]))
    sess = ops.session(model.SerializeToString())
    good = w.outlier_col_idx
    np.testing.assert_allclose(sess.run(None, {"X": _x((1, 64)), name: good})[0], w.matmul(_x((1, 64))),
                               rtol=0, atol=1e-4)
    bad = good.copy()
    bad[1] = 70
    with pytest.raises(Exception, match=r"outlier_col_idx\[1\]=70 is out of range for K=64"):
        sess.run(None, {"X": _x((1, 64)), name: bad})


def test_bad_attribute_fails_at_session_creation():
    w = random_weight(N=8, K=64, bits=4, group_size=32, seed=0)
    w.bits = 5
    with pytest.raises(Exception, match="bits must be 2, 3, 4 or 8, got 5"):
        ops.session(single_op_model(w).SerializeToString())


def test_weights_fed_at_run_time_are_not_packed_once():
    # The packed decode path packs qweight once per session, so it must only take initializer weights: a qweight fed
    # as a graph input takes the unpacked path and every call sees the codes it was given.
    w = random_weight(N=40, K=64, bits=3, group_size=16, stat_bits=3, stat_group_size=16, seed=0)
    w2 = random_weight(N=40, K=64, bits=3, group_size=16, stat_bits=3, stat_group_size=16, seed=1)
    model = single_op_model(w, x_shape=("m", None))
    name = next(i for i in model.graph.node[0].input if i.endswith("qweight"))
    init = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.UINT8, list(w.qweight.shape)))
    sess = ops.session(model.SerializeToString())
    x = _x((1, 64))
    for q, ref in ((w.qweight, w.matmul(x)), (w2.qweight, dataclasses.replace(w, qweight=w2.qweight).matmul(x))):
        np.testing.assert_allclose(sess.run(None, {"X": x, name: q})[0], ref, rtol=0, atol=1e-4)


def _has_vnni() -> bool:
    return _has_avx512() and "avx512_vnni" in _cpu_flags()


_INT8_PATHS = [
    pytest.param("avx512", M, marks=pytest.mark.skipif(not _has_vnni(), reason="needs AVX512-VNNI"), id=f"vnni-M{M}")
    for M in (1, 3, 8, 20)
] + [
    # CPUs without AVX-512: vpmaddubsw, slices of up to 4 rows (M=7: 4 + 3; M=20, prefill sizes: 5 slices of 4)
    pytest.param("avx2", M, marks=pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs AVX2"),
                 id=f"avx2-M{M}")
    for M in (1, 3, 7, 20)
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,K", [(16, 600), (16, 584), (64, 600), (128, 576)])
@pytest.mark.parametrize("stats", [(3, 16), (3, 32), (0, 16), (3, 8)])
@pytest.mark.parametrize("isa,M", _INT8_PATHS)
def test_int8_activation_path(bits, group_size, K, stats, isa, M, monkeypatch):
    # accuracy_level=4: X is quantized to int8 per 32 stored columns, per 16 where the groups are 16 columns (scale
    # max|x| / 127 of those columns; XScalesPerChunk in packed.h). Each output may then move
    # by at most sum_j |dense W[n, j]| * scale_j / 2 (outliers and the zero-point term keep exact x), which this test
    # holds the kernel to; it also checks that the result is not the fp32 one (the int8 path really ran).
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    if isa == "avx2":
        monkeypatch.setenv("QCOMPILER_CPU_ISA", "avx2")
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=stats[0], stat_group_size=stats[1],
                      outlier_rate=0.02, permute=True, bias=True, seed=bits * 100 + group_size + M)
    x = _x((M, K), seed=M)
    y = _run(w, x, accuracy_level=4)
    ref = w.matmul(x)
    dense = dataclasses.replace(w, outlier_row_ptr=None, outlier_col_idx=None, outlier_values=None).dequantize()
    stored = x[:, w.perm] if w.perm is not None else x
    span = 16 if group_size == 16 else 32  # columns per X scale
    blocks = -(-K // span)
    padded = np.zeros((M, blocks * span), np.float32)
    padded[:, :K] = stored
    step = np.abs(padded.reshape(M, blocks, span)).max(axis=2) / 127.0  # [M, blocks]
    step_stored = np.repeat(step, span, axis=1)[:, :K]
    step_orig = np.empty_like(step_stored)
    step_orig[:, w.perm if w.perm is not None else np.arange(K)] = step_stored
    bound = (step_orig / 2) @ np.abs(dense).T  # [M, N]
    scale = float(np.abs(ref).max())
    err = np.abs(y - ref)
    assert (err <= bound * 1.001 + 1e-5 * scale).all(), float((err - bound).max())
    assert err.max() > 1e-6 * scale  # not the fp32 result
    assert err.max() < 0.05 * scale
    if isa == "avx2" and _has_vnni():  # the same int8 arithmetic as the VNNI kernel (exact integer sums)
        monkeypatch.delenv("QCOMPILER_CPU_ISA")
        np.testing.assert_allclose(y, _run(w, x, accuracy_level=4), rtol=0, atol=1e-6 * scale)


def _int8_emulation(w, x: np.ndarray) -> np.ndarray:
    """What the int8 path computes, in float64: X in stored column order quantized per span (16 columns with 16-column
    groups, else 32) as the kernels do it in fp32 (scale max|x| / 127, x · (127 / max) rounded half to even, clamped
    to ±127), the codes' dot products with those int8 values, the zero-point term with the exact group sums of x,
    then outliers (exact x) and bias."""
    M, K = x.shape
    stored = (x[:, w.perm] if w.perm is not None else x).astype(np.float32)
    span = 16 if w.group_size == 16 else 32
    padded = np.zeros((M, -(-K // 32) * 32), np.float32)
    padded[:, :K] = stored
    spans = padded.reshape(M, -1, span)
    amax = np.abs(spans).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(spans * inv), -127, 127)  # float32 product, then round half to even
    xhat = (q.astype(np.float64) * (amax / np.float32(127.0)).astype(np.float64)).reshape(M, -1)[:, :K]
    s, z = (t.astype(np.float64) for t in w.group_stats())  # [N, G]
    g = np.arange(K) // w.group_size
    dense = s[:, g] * w.codes().astype(np.float64)  # s · code, stored order
    sums = np.zeros((M, w.n_groups))
    np.add.at(sums.T, g, stored.T.astype(np.float64))  # exact-ish group sums of x
    y = xhat @ dense.T - sums @ (s * z).T
    if w.outlier_values is not None:
        rows = np.repeat(np.arange(w.N), np.diff(w.outlier_row_ptr))
        cols = w.outlier_col_idx.astype(np.int64)
        vals = w.outlier_values.astype(np.float64)
        np.add.at(y.T, rows, (stored[:, cols].astype(np.float64) * vals).T)
    if w.bias is not None:
        y = y + w.bias.astype(np.float64)
    return y


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size,K", [(16, 600), (64, 600)])
@pytest.mark.parametrize("isa,M", _INT8_PATHS)
def test_int8_path_matches_its_emulation(bits, group_size, K, isa, M, monkeypatch):
    # The int8 path to fp32 rounding: X's int8 preparation (ISA-specific: AVX2, AVX-512) rounds each value as the
    # emulation does, so one value rounded the other way (an error of ~3e-4 of max|y| here) fails the tolerance.
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    if isa == "avx2":
        monkeypatch.setenv("QCOMPILER_CPU_ISA", "avx2")
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=3, stat_group_size=16,
                      outlier_rate=0.02, permute=True, bias=True, seed=bits * 7 + group_size + M)
    x = _x((M, K), seed=M + 11)
    y = _run(w, x, accuracy_level=4)
    ref = _int8_emulation(w, x)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * scale)
    assert np.abs(y - w.matmul(x)).max() > 2e-4 * scale  # the fp32 result is farther away than the tolerance


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs AVX2")
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size,K", [(16, 600), (64, 600)])
@pytest.mark.parametrize("stats", [(3, 16), (2, 32), (4, 16), (0, 16), (3, 8)])
def test_avx2_int8_one_row_equals_a_row_of_two(bits, group_size, K, stats, monkeypatch):
    # AVX2 takes a whole block of 16 rows per pass (statistics tables shared by its halves; 4-bit statistic codes
    # excepted: two 8-row passes), one row of X (decode) or 2..4 (prefill slices) at a time: the same integer sums
    # and fp32 steps per row, so a row of a multi-row call equals the one-row call bit for bit (X is quantized to
    # int8 row by row).
    monkeypatch.setenv("QCOMPILER_CPU_ISA", "avx2")
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    w = random_weight(N=70, K=K, bits=bits, group_size=group_size, stat_bits=stats[0], stat_group_size=stats[1],
                      outlier_rate=0.02, permute=True, bias=True, seed=bits * 10 + group_size + stats[0])
    # (M < 4: from 4 rows on, the outliers are added through X transposed, in fp32 per row, not in fp64 totals)
    x = _x((3, K), seed=3)
    y1 = _run(w, x[:1], accuracy_level=4)
    for M in (2, 3):  # both halves per pass at 2..4 rows too (prefill slices)
        np.testing.assert_array_equal(y1[0], _run(w, x[:M], accuracy_level=4)[0])
    np.testing.assert_array_equal(_run(w, x[2:3], accuracy_level=4)[0], _run(w, x, accuracy_level=4)[2])
    assert not np.array_equal(y1[0], w.matmul(x[:1])[0])  # the int8 path ran


@pytest.mark.parametrize("isa,M", [p for p in _INT8_PATHS if p.values[1] == 1])
def test_int8_x_scales_per_16_columns_with_16_column_groups(isa, M, monkeypatch):
    # With 16-column groups each half of a 32-column chunk of X has its own int8 scale: a half of small values next
    # to a half of large ones keeps its precision. Here the large half is exactly representable (integers, max 127:
    # scale 1), so the whole error comes from the small half; one scale per 32 columns would round it all to zero
    # (an error of |W[:, 16:32] @ x[16:32]|, ~100x the per-16 bound checked here).
    monkeypatch.setenv("QCOMPILER_CPU_REQUIRE_PACKED", "1")
    if isa == "avx2":
        monkeypatch.setenv("QCOMPILER_CPU_ISA", "avx2")
    K = 64
    w = random_weight(N=48, K=K, bits=4, group_size=16, stat_bits=3, stat_group_size=16, outlier_rate=0.0,
                      permute=False, bias=False, seed=5)
    rng = np.random.default_rng(6)
    x = np.zeros((1, K), np.float32)
    x[0, :16] = rng.integers(-126, 127, 16)
    x[0, 0] = 127.0
    x[0, 16:32] = rng.uniform(0.2, 0.3, 16) * rng.choice([-1.0, 1.0], 16)
    x[0, 32:] = rng.integers(-127, 128, K - 32)
    x[0, 32], x[0, 48] = 127.0, 127.0
    y = _run(w, x, accuracy_level=4)
    ref = w.matmul(x)
    dense = w.dequantize()
    # the other halves are exact in int8 (integers, max 127): only x[16:32] is rounded, by at most half its step
    bound = (np.abs(x[0, 16:32]).max() / 127.0 / 2) * np.abs(dense[:, 16:32]).sum(axis=1)
    tol = 1e-5 * np.abs(ref).max()  # fp32 accumulation order
    err = np.abs(y - ref)[0]
    assert (err <= bound * 1.001 + tol).all(), float((err - bound).max())
    per_32_error = np.abs(dense[:, 16:32] @ x[0, 16:32])  # what one scale per 32 columns would lose
    assert per_32_error.max() > 10 * (bound.max() + tol)


def test_accuracy_level_is_validated():
    w = random_weight(N=8, K=64, bits=4, group_size=32, seed=0)
    model = single_op_model(w, x_shape=("m", None), accuracy_level=4)
    next(a for a in model.graph.node[0].attribute if a.name == "accuracy_level").i = 7
    with pytest.raises(Exception, match="accuracy_level must be 0..4, got 7"):
        ops.session(model.SerializeToString())


# One test per malformed-input class (tests/test_fuzz_spqr_matmul.py draws hundreds of random ones): each is an ORT
# error naming the node and the problem.
def _corrupt_init(model: onnx.ModelProto, name: str, fn) -> None:
    t = next(t for t in model.graph.initializer if t.name == f"layer/{name}")
    t.CopyFrom(onnx.numpy_helper.from_array(fn(onnx.numpy_helper.to_array(t).copy()), t.name))


def _set(a: np.ndarray, idx, value) -> np.ndarray:
    a[idx] = value
    return a


@pytest.mark.parametrize("name,fn,attrs,message", [
    ("scales", lambda a: a.astype(np.float32), {}, r"input scales must be uint8, got float32"),
    ("outlier_row_ptr", lambda a: a.astype(np.int64), {}, r"\(layer/outlier_row_ptr\) of operator \(SpQRMatMul\) "
     r"in node \(layer/SpQRMatMul\) is invalid"),
    ("qweight", lambda a: a.reshape(-1), {}, r"input qweight has shape \[256\], expected \[8, 32\]"),
    ("stats2", lambda a: a[:, :, :3], {}, r"input stats2 has shape \[2, 1, 3\], expected \[2, 1, 4\]"),
    ("outlier_row_ptr", lambda a: _set(a, 4, a[-1] + 1), {}, r"outlier_row_ptr must be non-decreasing \(row 4\)"),
    ("outlier_row_ptr", lambda a: _set(a, 0, 1), {}, r"outlier_row_ptr must start at 0 and end at nnz=\d+, got 1"),
    ("outlier_col_idx", lambda a: _set(a, 2, 64), {}, r"outlier_col_idx\[2\]=64 is out of range for K=64"),
    ("perm", lambda a: _set(a, 5, a[6]), {}, r"perm is not a permutation: \d+ appears twice \(perm\[6\]\)"),
    ("perm", lambda a: _set(a, 3, -1), {}, r"perm\[3\]=-1 is out of range for K=64"),
    (None, None, {"group_size": 16}, r"input scales has shape \[2, 12\], expected \[4, 12\]"),
    (None, None, {"N": 2**33}, r"K and N must be at most 2147483647 \(K=64, N=8589934592\)"),
    (None, None, {"K": -64}, r"K and N must be positive \(K=-64, N=8\)"),
    (None, None, {"stat_bits": 0}, r"input scales must be float16, got uint8"),
], ids=["dtype-kernel-checked", "dtype-typed-input", "rank", "shape", "row-ptr-order", "row-ptr-start", "col-idx",
        "perm-duplicate", "perm-range", "group-size-vs-buffers", "huge-N", "negative-K", "stat-bits-vs-buffers"])
def test_malformed_inputs_are_ort_errors_naming_node_and_problem(name, fn, attrs, message):
    w = random_weight(N=8, K=64, bits=4, group_size=32, stat_bits=3, stat_group_size=16, outlier_rate=0.1,
                      permute=True, seed=0)
    model = single_op_model(w, x_shape=("m", None))
    if name is not None:
        _corrupt_init(model, name, fn)
    for a in model.graph.node[0].attribute:
        if a.name in attrs:
            a.i = attrs[a.name]
    with pytest.raises(Exception, match=message) as err:
        ops.session(model.SerializeToString()).run(None, {"X": _x((1, 64))})
    assert "layer/SpQRMatMul" in str(err.value)


def test_outliers_need_k_addressable_by_uint16():
    small = random_weight(N=2, K=64, bits=2, group_size=32, outlier_rate=0.2, seed=0)
    w = dataclasses.replace(random_weight(N=2, K=65537, bits=2, group_size=128, seed=0),
                            outlier_row_ptr=small.outlier_row_ptr, outlier_col_idx=small.outlier_col_idx,
                            outlier_values=small.outlier_values)
    with pytest.raises(Exception, match=r"outliers need K <= 65536 \(uint16 column indices\), got K=65537"):
        ops.session(single_op_model(w, x_shape=("m", None)).SerializeToString()).run(None, {"X": _x((1, 65537))})


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64)])
def test_zero_size_batch_gives_an_empty_output(shape):
    w = random_weight(N=8, K=64, bits=3, group_size=16, stat_bits=3, outlier_rate=0.1, permute=True, seed=0)
    sess = ops.session(single_op_model(w, x_shape=[f"d{i}" for i in range(len(shape) - 1)] + [None])
                       .SerializeToString())
    y = sess.run(None, {"X": np.zeros(shape, np.float32)})[0]
    assert y.shape == shape[:-1] + (8,) and y.dtype == np.float32


@pytest.mark.parametrize("fed", [False, True], ids=["initializer", "fed-at-run-time"])
def test_float32_fp16_statistics_are_accepted(fed):
    # ONNX Runtime's CPU EP casts fp16 scales/zeros up to float32 when it moves part of an fp16 graph to fp32:
    # the kernel takes them (converting back to fp16 exactly)
    w = random_weight(N=40, K=96, bits=3, group_size=16, outlier_rate=0.02, permute=True, seed=4)
    model = single_op_model(w, x_shape=("m", None))
    feeds = {"X": _x((3, 96))}
    for name in ("scales", "zeros"):
        t = next(t for t in model.graph.initializer if t.name == f"layer/{name}")
        arr = onnx.numpy_helper.to_array(t).astype(np.float32)
        if fed:
            model.graph.initializer.remove(t)
            model.graph.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, arr.shape))
            feeds[t.name] = arr
        else:
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    y = ops.session(model.SerializeToString()).run(None, feeds)[0]
    ref = w.matmul(feeds["X"])
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
