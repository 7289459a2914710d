// C entries of the SpQRMatMul CUDA launcher for tests and benchmarks on a GPU without ONNX Runtime: device pointers
// in, the launch enqueued on `stream`. tests/cuda_direct.py builds this file with the CUDA sources
// (custom_ops/src/cuda/*.cu) into libqcompiler_cuda_direct.so (nvcc, the GPU's architecture) and calls it through
// ctypes with PyTorch's device buffers; the op library does not contain it (ONNX Runtime binds the kernel through
// spqr_matmul_cuda.cc), nor does the wheel ship this folder. The QCOMPILER_CUDA_* switches are read at each call.
#include <cuda_runtime.h>

#include "common/env_switches.h"
#include "cuda/spqr_matmul_cuda_impl.cuh"
#include "spqr_matmul_c_args.h"

#define QC_DIRECT_PARAMS                                                                                           \
  int64_t M, int64_t K, int64_t N, int bits, int64_t group_size, int stat_bits, int64_t stat_group_size,           \
      const void *x, int x_is_half, const uint8_t *qweight, const void *scales, const void *zeros,                 \
      const uint16_t *stats2, const int32_t *row_ptr, const uint16_t *col_idx, const uint16_t *values,             \
      const int32_t *perm, const void *bias, int bias_is_half, int activation, void *y
#define QC_DIRECT_ARGS                                                                                             \
  M, K, N, bits, group_size, stat_bits, stat_group_size, x, x_is_half, qweight, scales, zeros, stats2, row_ptr,    \
      col_idx, values, perm, bias, bias_is_half, activation, y

extern "C" {

// Device bytes the call needs in `scratch` (0: none).
__attribute__((visibility("default"))) size_t qc_cuda_scratch_bytes(QC_DIRECT_PARAMS) {
  return qcompiler::Cuda::ScratchBytes(qcompiler::Cuda::MakeArgs(QC_DIRECT_ARGS));
}

// Enqueues the call on `stream` (a cudaStream_t; nullptr: the default stream). Returns the cudaError_t value:
// cudaErrorInvalidValue when `scratch_bytes` is below qc_cuda_scratch_bytes.
__attribute__((visibility("default"))) int qc_cuda_spqr_matmul(QC_DIRECT_PARAMS, void* scratch, size_t scratch_bytes,
                                                               void* stream) {
  qcompiler::Cuda::SpQRMatMulArgs a = qcompiler::Cuda::MakeArgs(QC_DIRECT_ARGS);
  if (qcompiler::Cuda::ScratchBytes(a) > scratch_bytes) return static_cast<int>(cudaErrorInvalidValue);
  a.scratch = scratch;
  return qcompiler::Cuda::LaunchSpQRMatMul(a, qcompiler::env::ReadCudaSwitches(), stream);
}

__attribute__((visibility("default"))) const char* qc_cuda_error_string(int error) {
  return qcompiler::Cuda::CudaErrorString(error);
}

}  // extern "C"
