"""tests/cuda_direct.py where no GPU is: the direct library builds with nvcc (sm_90), exports its C entries, and its
host-side paths answer through the same argument marshalling (KernelCall) that the GPU runs use — the scratch size of
a permuted fp16 prefill, an empty call, a refused scratch. Its launches need a GPU: tests/test_spqr_matmul_cuda.py's
`direct` backend."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tests import cuda_direct
from tests.cuda_emu import KernelCall
from tests.builders import random_weight

pytestmark = pytest.mark.skipif(cuda_direct.nvcc() is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def kernel():
    return cuda_direct.DirectKernel(cuda_direct.build("sm_90"))


def _args(kernel, weight, x):
    call = KernelCall(weight, x)
    fake = [None if a is None else 4096 * (i + 1) for i, a in enumerate(call.arrays)]  # never dereferenced
    return call.c_args(fake)


def test_scratch_is_asked_for_the_permuted_fp16_prefill_only(kernel):
    w = random_weight(N=64, K=96, bits=3, group_size=16, permute=True, seed=1)
    assert kernel.lib.qc_cuda_scratch_bytes(*_args(kernel, w, np.zeros((16, 96), np.float16))) == 16 * 96 * 2
    assert kernel.lib.qc_cuda_scratch_bytes(*_args(kernel, w, np.zeros((4, 96), np.float16))) == 0  # decode GEMV
    assert kernel.lib.qc_cuda_scratch_bytes(*_args(kernel, w, np.zeros((16, 96), np.float32))) == 0  # row kernel
    w = random_weight(N=64, K=96, bits=3, group_size=16, permute=False, seed=1)
    assert kernel.lib.qc_cuda_scratch_bytes(*_args(kernel, w, np.zeros((16, 96), np.float16))) == 0


def test_host_side_answers(kernel):
    w = random_weight(N=64, K=96, bits=3, group_size=16, permute=True, seed=2)
    # no rows: nothing to launch, success without touching the device
    assert kernel.lib.qc_cuda_spqr_matmul(*_args(kernel, w, np.zeros((0, 96), np.float16)), None, 0, None) == 0
    # the permuted prefill without its scratch: refused (cudaErrorInvalidValue) before any launch
    err = kernel.lib.qc_cuda_spqr_matmul(*_args(kernel, w, np.zeros((16, 96), np.float16)), None, 0, None)
    assert err == 1
    assert kernel.lib.qc_cuda_error_string(err).decode() == "invalid argument"


def test_launch_choices_are_the_launchers(kernel):  # (same function as the emulation's, in nvcc's build)
    assert [kernel.gemv_rows_per_warp(1, n, 132) for n in (576, 4096, 11008)] == [1, 2, 4]
    assert [kernel.prefill_uses_large_tile(m, 11008, 132) for m in (64, 512)] == [False, True]


def test_exports_its_c_entries():  # (built with hidden visibility: only what is marked default is there)
    lib = ctypes.CDLL(str(cuda_direct.build("sm_90")))
    for name in ("qc_cuda_scratch_bytes", "qc_cuda_spqr_matmul", "qc_cuda_error_string", "qc_gemv_rows_per_warp",
                 "qc_prefill_uses_large_tile"):
        assert hasattr(lib, name)
