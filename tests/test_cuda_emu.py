"""The CUDA emulation (custom_ops/emu, tests/cuda_emu.py) reports the faults it claims to catch: each self-test kernel
(custom_ops/testing/emu/emu_selftest.cc) has one, and a correct twin must pass."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tests import cuda_emu

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def selftest():
    lib = ctypes.CDLL(str(cuda_emu.build()))
    fn = lib.qc_emu_selftest
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]

    def run(which: int, seed: int = 0, tag: int = 1):
        out = np.full(64, -1, np.int32)
        msg = ctypes.create_string_buffer(256)
        err = fn(which, seed, tag, out.ctypes.data, msg, len(msg))
        return err, msg.value.decode(), out

    return run


def test_neighbour_read_after_the_barrier_is_right_in_every_order(selftest):
    for seed in range(8):
        err, _, out = selftest(0, seed, tag=seed + 1)
        assert err == 0
        np.testing.assert_array_equal(out, (seed + 1) * 64 + (np.arange(64) + 1) % 64)


def test_a_missing_barrier_shows_as_a_wrong_result(selftest):
    wrong = 0
    for seed in range(8):
        err, _, out = selftest(1, seed, tag=seed + 100)
        assert err == 0
        wrong += int(np.any(out != (seed + 100) * 64 + (np.arange(64) + 1) % 64))
    assert wrong == 8  # each order runs some reader before its neighbour's write


def test_syncwarp_orders_a_warps_shared_memory(selftest):  # (the prefill kernel's epilogue relies on it)
    for seed in range(8):
        err, _, out = selftest(5, seed, tag=seed + 100)
        assert err == 0
        lanes = np.arange(64)
        assert np.array_equal(out, (seed + 100) * 64 + (lanes & ~31) + ((lanes & 31) + 1) % 32)


@pytest.mark.parametrize("which,message", [
    (2, "__syncthreads reached after 32 threads of the block returned"),
    (3, "a warp collective reached by 16 of the 32 lanes of warp 0"),
    (4, "wmma::load_matrix_sync: pointer not 32-byte aligned"),
    (6, "a warp collective reached by 16 of the 32 lanes of warp 0"),
    (7, "a warp collective with a partial lane mask"),
])
def test_faults_fail_the_launch(selftest, which, message):
    err, msg, _ = selftest(which)
    assert err != 0 and message in msg, msg
