"""The SpQRMatMul CUDA kernels (custom_ops/src/cuda/*.cu) run on the CPU under the emulation of
custom_ops/testing/emu: the same device code, compiled by the host C++ compiler, its threads as fibers (see
custom_ops/testing/emu/cuda_emu.h for what is and is not modelled). Tests only: it checks the kernels' indexing, decoding,
barriers and warp collectives where no GPU is; it says nothing about their speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

from qcompiler.graph.format import SpQRWeight

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "custom_ops"
TESTING = OPS / "testing"  # test-only C++ (not in the wheel): the emulation, the C entries
# the CUDA sources (compiled as C++ here), as CMakeLists.txt lists them for the op library
CUDA_SOURCES = [OPS / "src/cuda" / name for name in ("launcher.cu", "decode_gemv.cu", "prefill.cu", "generic_rows.cu",
                                                        "activation.cu")]
SOURCES = [*CUDA_SOURCES, OPS / "src/common/env_switches.cc", TESTING / "emu/cuda_emu.cc",
           TESTING / "emu/spqr_matmul_emu.cc", TESTING / "emu/emu_selftest.cc", TESTING / "launch_choices_c.cc"]
HEADERS = [TESTING / "emu/cuda_emu.h", OPS / "src/cuda/spqr_matmul_cuda_impl.cuh", OPS / "src/cuda/kernels.cuh",
           OPS / "src/cuda/device_common.cuh", TESTING / "spqr_matmul_c_args.h", OPS / "src/cuda/launch.cuh",
           OPS / "src/common/spqr_format.h", OPS / "src/common/env_switches.h"]


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++"))


def build(out_root: Path = REPO / "build" / "cuda-emu") -> Path:
    """Compile libqcompiler_cuda_emu.so (cached by the sources' hash and flags). `$QCOMPILER_EMU_SANITIZE=undefined`
    adds -fsanitize=undefined (scripts/sanitize.sh): shifts, overflows and misaligned accesses in the device code
    abort the process. Raises RuntimeError with the compiler output."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    sanitize = os.environ.get("QCOMPILER_EMU_SANITIZE", "")
    extra = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"] if sanitize else []
    return cached_library(out_root / "libqcompiler_cuda_emu.so", SOURCES + HEADERS, " ".join(extra), lambda out: [
        cxx, "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
        "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-DQCOMPILER_CUDA_EMU",
        f"-I{TESTING / 'emu/include'}", f"-I{TESTING / 'emu'}", f"-I{TESTING}", f"-I{OPS / 'src'}",
        *extra, "-x", "c++", *map(str, CUDA_SOURCES), "-x", "none", *map(str, SOURCES[len(CUDA_SOURCES):]),
        "-o", str(out)],
        "the CUDA emulation")


def cached_library(path: Path, inputs: list, salt: str, command, what: str) -> Path:
    """`path` with a folder named by the hash of `inputs` and `salt` inserted before its name, built by
    `command(output_path)` unless already there (written to a temporary name, then renamed: concurrent builds do not
    see half a library). Raises RuntimeError with the compiler's output."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + salt.encode()).hexdigest()[:16]
    lib = path.parent / digest / path.name
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = command(tmp)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {what} failed:\n{' '.join(cmd)}\n{r.stderr}")
    tmp.replace(lib)
    return lib


class _Buffer:
    """An emulator buffer (256-aligned, a guard page after it) holding a copy of `array`."""

    def __init__(self, lib, array: np.ndarray):
        self.lib, self.nbytes = lib, max(int(array.nbytes), 1)
        self.ptr = lib.qc_emu_alloc(self.nbytes)
        if not self.ptr:
            raise MemoryError("qc_emu_alloc failed")
        ctypes.memmove(self.ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)

    def read(self, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        ctypes.memmove(out.ctypes.data, self.ptr, out.nbytes)
        return out

    def free(self) -> None:
        self.lib.qc_emu_free(self.ptr, self.nbytes)


class KernelCall:
    """One SpQRMatMul call's host arrays, in the order of the C entries' pointer arguments (x, qweight, scales, zeros,
    stats2, row_ptr, col_idx, values, perm, bias, y; None for an absent input), bound as the CUDA EP binding
    (custom_ops/src/cuda/spqr_matmul_cuda.cc) binds them; `c_args(pointers)` is the C entries' argument list up to y.
    Shared by the emulated kernels and the direct GPU runs (tests/cuda_direct.py)."""

    #: the `activation` attribute's values as the C entries take them (common/spqr_format.h kActivation*)
    ACTIVATIONS = {"": 0, "silu_mul": 1}

    def __init__(self, weight: SpQRWeight, x: np.ndarray, bias_dtype=None, activation: str = ""):
        w = self.weight = weight
        self.activation = self.ACTIVATIONS[activation]
        self.n_out = w.N // 2 if self.activation else w.N
        self.M = int(np.prod(x.shape[:-1], dtype=np.int64))
        self.lead = x.shape[:-1]
        self.x_is_half = x.dtype == np.float16
        bias = None if w.bias is None else w.bias.astype(bias_dtype or x.dtype)
        self.bias_is_half = bias is not None and bias.dtype == np.float16
        u16 = (lambda a: None if a is None else np.ascontiguousarray(a).view(np.uint16))
        self.arrays = [x.reshape(self.M, w.K), w.qweight, w.scales if w.stat_bits else u16(w.scales),
                       w.zeros if w.stat_bits else u16(w.zeros), u16(w.stats2), w.outlier_row_ptr,
                       w.outlier_col_idx, u16(w.outlier_values), w.perm, bias,
                       np.full((self.M, self.n_out), np.nan, dtype=x.dtype)]

    def c_args(self, ptr: list) -> list:
        w = self.weight
        return [self.M, w.K, w.N, w.bits, w.group_size, w.stat_bits, w.stat_group_size, ptr[0], int(self.x_is_half),
                *ptr[1:9], ptr[9], int(self.bias_is_half), self.activation, ptr[10]]

    def result(self, y: np.ndarray) -> np.ndarray:
        return y.reshape(*self.lead, self.n_out)


# Rows per warp each decode GEMV tile (rows of X: 1, 2, 3-4, 5-8) offers, most first (GemvOffers, kernels.cuh)
GEMV_ROWS = {1: (4, 2, 1), 2: (4, 2), 4: (2, 1), 8: (2, 1)}


def bind_launch_choices(lib):
    """`lib` (either test library: both hold custom_ops/testing/launch_choices_c.cc) with its launch-choice entries
    typed."""
    i64, i32 = ctypes.c_int64, ctypes.c_int
    for name in ("qc_gemv_rows_per_warp", "qc_prefill_uses_large_tile"):
        getattr(lib, name).restype = i32
        getattr(lib, name).argtypes = [i64, i64, i32]
    return lib


class LaunchChoices:
    """The launcher's modelled choices for M rows of X and N outputs on a GPU of `sms` multiprocessors, through
    `self.lib` (bound by bind_launch_choices)."""

    def gemv_rows_per_warp(self, M: int, N: int, sms: int) -> int:
        """Rows per warp the decode GEMV takes."""
        return self.lib.qc_gemv_rows_per_warp(M, N, sms)

    def prefill_uses_large_tile(self, M: int, N: int, sms: int) -> bool:
        """Whether the prefill kernel takes its 128 x 128 tile."""
        return bool(self.lib.qc_prefill_uses_large_tile(M, N, sms))


class EmulatedKernel(LaunchChoices):
    """`run(weight, x)`: Y = SpQRMatMul(X) by the CUDA launcher under emulation, with the inputs bound as the CUDA EP
    binding (custom_ops/src/cuda/spqr_matmul_cuda.cc) binds them."""

    def __init__(self, lib_path: Path):
        lib = ctypes.CDLL(str(lib_path))
        lib.qc_emu_alloc.restype = ctypes.c_void_p
        lib.qc_emu_alloc.argtypes = [ctypes.c_size_t]
        lib.qc_emu_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.qc_emu_spqr_matmul.restype = i32
        lib.qc_emu_spqr_matmul.argtypes = [i64, i64, i64, i32, i64, i32, i64, p, i32, p, p, p, p, p, p, p, p, p, i32,
                                           i32, p, ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t]
        self.lib = bind_launch_choices(lib)

    def run(self, weight: SpQRWeight, x: np.ndarray, *, bias_dtype=None, seed: int = 0,
            activation: str = "") -> np.ndarray:
        """`x` [..., K] fp32 or fp16 -> [..., N] (with `activation` "silu_mul": [..., N/2]) of the same dtype. Raises
        RuntimeError on a failed launch."""
        call = KernelCall(weight, x, bias_dtype, activation)
        bufs = [None if a is None else _Buffer(self.lib, a) for a in call.arrays]
        msg = ctypes.create_string_buffer(512)
        try:
            err = self.lib.qc_emu_spqr_matmul(*call.c_args([None if b is None else b.ptr for b in bufs]), seed, msg,
                                              len(msg))
            if err:
                raise RuntimeError(f"emulated launch failed (cudaError {err}): {msg.value.decode()}")
            return call.result(bufs[-1].read(call.arrays[-1]))
        finally:
            for b in bufs:
                if b is not None:
                    b.free()
