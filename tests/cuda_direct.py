"""The SpQRMatMul CUDA kernels run directly on a GPU, without ONNX Runtime: custom_ops/src/cuda/*.cu plus the C
entries of custom_ops/testing/spqr_matmul_cuda_direct.cc (test-only, not in the wheel), built by nvcc for the
visible GPU's architecture into libqcompiler_cuda_direct.so, launched through ctypes on PyTorch's current stream
with PyTorch's device buffers.

For a GPU machine that has PyTorch with CUDA and nvcc but neither onnxruntime-gpu nor a CUDA build of the op library
(the one this project is lent): the kernels' correctness (`direct` backend of tests/test_spqr_matmul_cuda.py) and
speed (bench/kernels_cuda_direct.py) there in one short run. What it does not cover: the ORT binding
(spqr_matmul_cuda.cc), which the `cuda` backend tests where the CUDA EP starts.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from tests.cuda_emu import CUDA_SOURCES, KernelCall, LaunchChoices, bind_launch_choices, cached_library
from qcompiler.graph.format import SpQRWeight

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "custom_ops" / "src"
TESTING = REPO / "custom_ops" / "testing"
SOURCES = [*CUDA_SOURCES, SRC / "common/env_switches.cc", TESTING / "spqr_matmul_cuda_direct.cc",
           TESTING / "launch_choices_c.cc"]
HEADERS = [SRC / "cuda/spqr_matmul_cuda_impl.cuh", SRC / "cuda/kernels.cuh", SRC / "cuda/device_common.cuh",
           TESTING / "spqr_matmul_c_args.h", SRC / "cuda/launch.cuh", SRC / "common/spqr_format.h",
           SRC / "common/env_switches.h"]


def nvcc() -> Optional[str]:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def gpu_arch() -> Optional[str]:
    """sm_XY of PyTorch's current CUDA device; None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def ready() -> bool:
    return nvcc() is not None and gpu_arch() is not None


def build(arch: str, out_root: Path = REPO / "build" / "cuda-direct") -> Path:
    """Compile libqcompiler_cuda_direct.so for `arch` (cached by the sources' hash). Raises RuntimeError with nvcc's
    output."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (PATH, /usr/local/cuda/bin or $CUDACXX)")
    return cached_library(out_root / "libqcompiler_cuda_direct.so", SOURCES + HEADERS, arch, lambda out: [
        compiler, "-std=c++17", "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
        f"-I{SRC}", f"-I{TESTING}", *map(str, SOURCES), "-o", str(out)], "the direct CUDA library")


class Launch:
    """One call's device buffers (x, the weight's arrays, y, scratch) and its launch: `()` enqueues the kernel on
    PyTorch's current stream (so it can be timed with CUDA events or captured in a CUDA graph), `output()` waits and
    returns y."""

    def __init__(self, lib, call: KernelCall, *, x=None):
        import torch

        self.lib, self.call = lib, call

        def dev(a):
            if a is None:
                return None
            a = np.ascontiguousarray(a)
            if a.dtype == np.uint16:  # the same bits; PyTorch's uint16 support is partial
                a = a.view(np.int16)
            return torch.from_numpy(a).cuda()

        # x: a shared X already on the device (benchmarks), else a copy of the call's
        self.tensors = [x if x is not None else dev(call.arrays[0])] + [dev(a) for a in call.arrays[1:]]
        ptr = [None if t is None else t.data_ptr() for t in self.tensors]
        self.args = call.c_args(ptr)
        nbytes = int(lib.qc_cuda_scratch_bytes(*self.args))
        self.scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
        self.scratch_bytes = nbytes

    def __call__(self) -> None:
        import torch

        stream = torch.cuda.current_stream().cuda_stream
        err = self.lib.qc_cuda_spqr_matmul(*self.args, self.scratch.data_ptr(), self.scratch_bytes, stream)
        if err:
            raise RuntimeError(f"launch failed: {self.lib.qc_cuda_error_string(err).decode()} ({err})")

    def output(self) -> np.ndarray:
        import torch

        torch.cuda.synchronize()
        y = self.tensors[-1].cpu().numpy().view(self.call.arrays[-1].dtype)
        return self.call.result(y)


class DirectKernel(LaunchChoices):
    """`run(weight, x)`: Y = SpQRMatMul(X) by the CUDA launcher on the GPU; `launch(weight, x)`: a Launch to time."""

    def __init__(self, lib_path: Path):
        lib = ctypes.CDLL(str(lib_path))
        i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        flat = [i64, i64, i64, i32, i64, i32, i64, p, i32, p, p, p, p, p, p, p, p, p, i32, i32, p]
        lib.qc_cuda_scratch_bytes.restype = ctypes.c_size_t
        lib.qc_cuda_scratch_bytes.argtypes = flat
        lib.qc_cuda_spqr_matmul.restype = i32
        lib.qc_cuda_spqr_matmul.argtypes = flat + [p, ctypes.c_size_t, p]
        lib.qc_cuda_error_string.restype = ctypes.c_char_p
        lib.qc_cuda_error_string.argtypes = [i32]
        self.lib = bind_launch_choices(lib)

    def launch(self, weight: SpQRWeight, x: np.ndarray, *, bias_dtype=None, x_device=None,
               activation: str = "") -> Launch:
        return Launch(self.lib, KernelCall(weight, x, bias_dtype, activation), x=x_device)

    def run(self, weight: SpQRWeight, x: np.ndarray, *, bias_dtype=None, activation: str = "") -> np.ndarray:
        """`x` [..., K] fp32 or fp16 -> [..., N] (with `activation` "silu_mul": [..., N/2]) of the same dtype. Raises
        RuntimeError on a failed launch."""
        launch = self.launch(weight, x, bias_dtype=bias_dtype, activation=activation)
        launch()
        return launch.output()
