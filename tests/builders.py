"""Test and benchmark builders that do not ship in the wheel (tests/ is not part of the package): random but
well-formed SpQR weights, one-node SpQRMatMul models, and whether a built op library carries the CUDA kernel.
Used by tests/, bench/ and scripts/."""

from __future__ import annotations

import math
import os
import pathlib
from typing import Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.graph.format import DOMAIN, OPSET_VERSION, SpQRWeight
from qcompiler.graph.onnx_op import spqr_node
from qcompiler.runtime import ops

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
# the marker CMake compiles into libqcompiler_ops.so (custom_ops/src/spqr_ops.cc) followed by 0 or 1
BUILD_INFO_MARK = b"QCOMPILER_OPS_BUILD_INFO cuda="


def random_weight(
    *,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    stat_bits: int = 0,
    stat_group_size: int = 16,
    outlier_rate: float = 0.0,
    permute: bool = False,
    bias: bool = False,
    seed: int = 0,
) -> SpQRWeight:
    """A random but well-formed `SpQRWeight` (for kernel tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    G = math.ceil(K / group_size)
    codes = rng.integers(0, 1 << bits, size=(N, K))
    stats2 = None
    if stat_bits == 0:
        scales = rng.uniform(0.005, 0.05, size=(N, G)).astype(np.float16)
        zeros = rng.integers(0, 1 << bits, size=(N, G)).astype(np.float16)
    else:
        N2 = math.ceil(N / stat_group_size)
        scales = rng.integers(0, 1 << stat_bits, size=(N, G))
        zeros = rng.integers(0, 1 << stat_bits, size=(N, G))
        stats2 = np.stack(
            [
                rng.uniform(0.002, 0.01, size=(G, N2)),
                rng.uniform(-2.0, -0.5, size=(G, N2)),
                rng.uniform(0.2, 1.0, size=(G, N2)),
                rng.uniform(-1.0, 0.0, size=(G, N2)),
            ],
            axis=-1,
        ).astype(np.float16)
    outliers = None
    if outlier_rate > 0:
        mask = rng.random((N, K)) < outlier_rate
        outliers = np.where(mask, rng.normal(0, 0.2, size=(N, K)), 0).astype(np.float16).astype(np.float32)
    return SpQRWeight.from_codes(
        codes=codes,
        bits=bits,
        group_size=group_size,
        scales=scales,
        zeros=zeros,
        stat_bits=stat_bits,
        stat_group_size=stat_group_size,
        stats2=stats2,
        outliers=outliers,
        perm=rng.permutation(K).astype(np.int32) if permute else None,
        bias=rng.normal(0, 0.1, size=N).astype(np.float32) if bias else None,
    )


def single_op_model(
    weight: SpQRWeight,
    *,
    x_dtype=np.float32,
    x_shape: Sequence[object] = ("batch", "seq", None),
    bias_dtype=None,
    accuracy_level: int = 0,
    fallback: bool = False,
    activation: str = "",
) -> onnx.ModelProto:
    """A one-node model `Y = SpQRMatMul(X)` for kernel tests and benchmarks. X's last dim is K. `fallback`: carry
    the portable ONNX function (qcompiler/graph/fallback.py), so the model also runs without the op library.
    `activation`: the node's `activation` attribute (Y's last dim N/2 with "silu_mul")."""
    x_dtype = np.dtype(x_dtype)
    shape = list(x_shape[:-1]) + [weight.K]
    node, inits = spqr_node(weight, x="X", y="Y", prefix="layer", bias_dtype=bias_dtype or x_dtype,
                            accuracy_level=accuracy_level, activation=activation)
    graph = helper.make_graph(
        [node],
        "spqr_matmul",
        [helper.make_tensor_value_info("X", NP_TO_ONNX[x_dtype], shape)],
        [helper.make_tensor_value_info("Y", NP_TO_ONNX[x_dtype],
                                       list(x_shape[:-1]) + [weight.N // 2 if activation else weight.N])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        ir_version=8,
    )
    if fallback:
        from qcompiler.graph.fallback import add_fallback_functions

        add_fallback_functions(model)
    return model


def has_cuda_kernel(path: Optional[Union[str, os.PathLike]] = None) -> bool:
    """Whether the library was compiled with the CUDA kernel (reads a marker from the file; does not load it)."""
    data = pathlib.Path(path or ops.library_path()).read_bytes()
    i = data.find(BUILD_INFO_MARK)
    return i >= 0 and data[i + len(BUILD_INFO_MARK) : i + len(BUILD_INFO_MARK) + 1] == b"1"
