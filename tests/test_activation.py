"""SpQRMatMul's `activation = "silu_mul"` (docs/spqr-format.md) and the `fuse-silu-mul` pass: the CPU kernel (each ISA
table, fp32/fp16, decode and prefill sizes, int8 activations), the CUDA launcher under emulation, the portable
fallback function, the attribute's checks, and the pass's structure and numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qcompiler.graph.format import DOMAIN, OP_TYPE, OPSET_VERSION, apply_activation
from qcompiler.runtime import ops
from tests import cuda_emu
from tests.builders import random_weight, single_op_model
from tests.helpers import assert_matches_reference

ACT = "silu_mul"


def _x(shape, dtype=np.float32, seed=1, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _weight(N=96, K=600, bits=4, group_size=16, stat_bits=3, seed=0, wide_bias=False):
    w = random_weight(N=N, K=K, bits=bits, group_size=group_size, stat_bits=stat_bits, stat_group_size=16,
                      outlier_rate=0.02, permute=True, bias=True, seed=seed)
    if wide_bias:  # gate products from deep in the negative tail to past e^88: silu's whole range, finite
        w.bias = np.linspace(-150.0, 150.0, N).astype(np.float32)
        w.bias[N // 2:] = 1.0
    return w


def _run(weight, x, **kw) -> np.ndarray:
    model = single_op_model(weight, x_dtype=x.dtype, x_shape=[f"d{i}" for i in range(x.ndim - 1)] + [None],
                            activation=ACT, **kw)
    return ops.session(model.SerializeToString()).run(None, {"X": x})[0]


def test_reference_is_silu_of_the_gate_half_times_the_up_half():
    z = np.array([[-1.0, 0.0, 2.0, 3.0, 5.0, -7.0]], np.float32)
    g, u = z[:, :3], z[:, 3:]
    np.testing.assert_allclose(apply_activation(z, ACT), g / (1 + np.exp(-g)) * u, rtol=1e-6)
    assert apply_activation(z, "") is z
    with pytest.raises(ValueError, match="even N"):
        apply_activation(z[:, :5], ACT)
    with pytest.raises(ValueError, match="unknown activation"):
        apply_activation(z, "gelu")


@pytest.mark.parametrize("isa", ["auto", "avx2", "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M", [1, 3, 40, 70])
def test_cpu_kernel_per_isa(isa, dtype, M, monkeypatch):
    # M=1/3: the decode GEMV; 40, 70: the prefill paths (70: more than one epilogue task of 16 rows)
    monkeypatch.setenv("QCOMPILER_CPU_ISA", isa)
    w = _weight(seed=M)
    x = _x((M, 600), dtype, seed=M)
    assert_matches_reference(w, x, _run(w, x, bias_dtype=np.float32), ACT)


@pytest.mark.parametrize("M", [1, 5])
def test_cpu_kernel_with_int8_activations(M):
    w = _weight(seed=7 + M)
    x = _x((M, 600), seed=M)
    y = _run(w, x, accuracy_level=4)
    level0 = _run(w, x)
    ref = apply_activation(w.matmul(x), ACT)
    assert y.shape == ref.shape
    # int8 X: within a few per cent of the fp32 product's scale, as without the activation
    assert np.abs(y - ref).max() <= 0.03 * np.abs(ref).max()
    assert_matches_reference(w, x, level0, ACT)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cpu_kernel_over_silus_whole_range(dtype):
    # gate products from −150 to +150 (bias): e^−z under- and overflows fp32 at the ends; the result stays finite and
    # equal to z·σ(z)·up (0 for very negative z, z for very positive)
    w = _weight(N=64, K=64, group_size=32, wide_bias=True, seed=3)
    x = _x((2, 64), np.float32, seed=3, scale=0.01)
    y = _run(w, x.astype(dtype), bias_dtype=np.float32).astype(np.float32)
    ref = apply_activation(w.matmul(x.astype(dtype)), ACT).astype(np.float32)
    assert np.isfinite(y).all()
    rel = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(y, ref, rtol=rel, atol=rel * np.abs(ref).max())


def test_kernel_rejects_an_odd_n_and_an_unknown_activation():
    w = _weight(N=95, seed=1)
    with pytest.raises(Exception, match="even N"):
        _run(w, _x((1, 600)))
    model = single_op_model(_weight(seed=2), activation=ACT)
    next(a for a in model.graph.node[0].attribute if a.name == "activation").s = b"gelu_mul"
    with pytest.raises(Exception, match='activation must be "" or "silu_mul", got "gelu_mul"'):
        ops.session(model.SerializeToString()).run(None, {"X": _x((1, 1, 600))})


@pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("dtype,M", [(np.float32, 1), (np.float16, 3), (np.float32, 12), (np.float16, 20)])
def test_cuda_launcher_under_emulation(dtype, M):
    # M ≤ 8: the decode GEMV; fp32 M=12: the row kernel; fp16 M=20: the prefill kernel (its permuted X in scratch
    # before the product Z)
    kernel = cuda_emu.EmulatedKernel(cuda_emu.build())
    w = _weight(seed=20 + M)
    x = _x((M, 600), dtype, seed=M)
    assert_matches_reference(w, x, kernel.run(w, x, bias_dtype=np.float32, activation=ACT), ACT)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fallback_function_without_the_library(dtype):
    w = _weight(N=40, K=100, seed=5)
    model = single_op_model(w, x_dtype=dtype, x_shape=("a", None), fallback=True, activation=ACT)
    onnx.checker.check_model(model)
    assert model.graph.node[0].overload.endswith("_silu_mul")
    x = _x((3, 100), dtype, seed=5)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = apply_activation(w.matmul(x), ACT)
    assert y.shape == (3, 20) and y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 3e-3
    assert np.abs(y.astype(np.float32) - ref.astype(np.float32)).max() <= tol * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------------------- pass
def _mlp(weight, *, sizes=None, gate_also_output=False, swap=False) -> onnx.ModelProto:
    """X → SpQRMatMul (gate rows, then up rows) → Split → gate·Sigmoid(gate) · up → Y, as the exporter writes it."""
    from qcompiler.graph.onnx_op import spqr_node

    h = weight.N // 2
    node, inits = spqr_node(weight, x="X", y="Z", prefix="mlp.gate_proj+up_proj")
    sizes = sizes or [h, h]
    inits.append(onnx.numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
    nodes = [node, helper.make_node("Split", ["Z", "sizes"], ["gate", "up"], axis=-1, name="split"),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["sig", "gate"] if swap else ["gate", "sig"], ["silu"], name="silu"),
             helper.make_node("Mul", ["up", "silu"] if swap else ["silu", "up"], ["Y"], name="mul")]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", sizes[0]])]
    if gate_also_output:
        outs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["m", sizes[0]]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", weight.K])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid(DOMAIN, OPSET_VERSION)], ir_version=10)


@pytest.mark.parametrize("swap", [False, True])
def test_pass_fuses_the_gated_product_into_the_node(swap):
    from qcompiler.passes import FuseSiluMul, run_pass

    w = _weight(N=64, K=96, group_size=32, seed=11)
    model = _mlp(w, swap=swap)
    x = _x((5, 96), seed=11)
    before = ops.session(model.SerializeToString()).run(None, {"X": x})[0]
    result = run_pass(FuseSiluMul(), model, ensures=True)
    out = result.model
    assert result.counts == {"fused": 1}
    assert [n.op_type for n in out.graph.node] == [OP_TYPE]
    node = out.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["activation"] == ACT.encode()
    assert list(node.output) == ["Y"] and not any(i.name == "sizes" for i in out.graph.initializer)
    after = ops.session(out.SerializeToString()).run(None, {"X": x})[0]
    assert after.shape == (5, 32)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert_matches_reference(w, x, after, ACT)


@pytest.mark.parametrize("case", ["unequal-split", "gate-is-an-output"])
def test_pass_leaves_other_shapes_alone(case):
    from qcompiler.passes import FuseSiluMul, run_pass

    w = _weight(N=64, K=96, group_size=32, seed=12)
    # (the unequal halves would not broadcast in the Mul; the pass only reads the structure)
    model = _mlp(w, sizes=[40, 24]) if case == "unequal-split" else _mlp(w, gate_also_output=True)
    result = run_pass(FuseSiluMul(), model)
    out = result.model
    assert result.counts == {"fused": 0} and not result.modified
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
