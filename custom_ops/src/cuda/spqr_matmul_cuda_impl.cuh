// Launcher of the SpQRMatMul CUDA kernels (launcher.cu; the kernels: kernels.cuh). Plain types only: included by the
// g++-compiled ORT kernel (spqr_matmul_cuda.cc) and by the nvcc-compiled device code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/env_switches.h"

namespace qcompiler {
namespace Cuda {

// Device pointers and sizes of one SpQRMatMul call (layout: docs/spqr-format.md). Optional inputs are nullptr.
struct SpQRMatMulArgs {
  int64_t M = 0;  // rows of X (leading dims flattened)
  int64_t K = 0;
  int64_t N = 0;
  int bits = 0;
  int64_t group_size = 0;
  int stat_bits = 0;
  int64_t stat_group_size = 0;
  const void* x = nullptr;  // [M, K] float or half
  bool x_is_half = false;
  const uint8_t* qweight = nullptr;  // [N, ceil(K/32)*4*bits]
  const void* scales = nullptr;      // half [G, N] or packed uint8 [G, ceil(N/32)*4*stat_bits]
  const void* zeros = nullptr;
  const uint16_t* stats2 = nullptr;  // half bits [G, N2, 4]
  const int32_t* row_ptr = nullptr;  // [N+1]
  const uint16_t* col_idx = nullptr;  // [nnz]
  const uint16_t* values = nullptr;   // half bits [nnz]
  const int32_t* perm = nullptr;      // [K]
  const void* bias = nullptr;         // [N] float or half
  bool bias_is_half = false;
  int activation = 0;  // spqr::kActivation*: none, or silu_mul (Y [M, N/2] from the product Z [M, N] in scratch)
  void* y = nullptr;  // [M, N] (with an activation [M, N/2]), same type as x
  void* scratch = nullptr;  // ScratchBytes(*this) bytes of device memory when that is not 0 (X's columns in stored
                            // order for the prefill kernel; then, 256-byte aligned, Z with an activation)
};

// Device memory LaunchSpQRMatMul needs in `args.scratch` (0: none). Only X's type, M, K, N, group_size, activation
// and whether perm is present matter.
size_t ScratchBytes(const SpQRMatMulArgs& args);

// Enqueues Y = X * W^T + bias on `stream` (a cudaStream_t), with the launch choices `switches` force (read once by
// the caller: common/env_switches.h). Returns a cudaError_t value (0 = success).
int LaunchSpQRMatMul(const SpQRMatMulArgs& args, const env::CudaSwitches& switches, void* stream);

// Rows per warp of the decode GEMV (M <= 8) for N output rows on a GPU of `sms` multiprocessors (0: unknown, the
// most the tile offers): the launcher's choice unless CudaSwitches::gemv_rows (QCOMPILER_CUDA_GEMV_ROWS) forces one.
int GemvRowsPerWarp(int64_t M, int64_t N, int sms);

// Whether the prefill kernel (fp16 X, M >= 9) takes its 128 x 128 tile (else 64 x 64) for M rows and N outputs on a
// GPU of `sms` multiprocessors (0: unknown): the launcher's choice unless CudaSwitches::prefill_tile
// (QCOMPILER_CUDA_PREFILL_TILE=64|128) forces one.
bool PrefillUsesLargeTile(int64_t M, int64_t N, int sms);

// cudaGetErrorString for a value returned by LaunchSpQRMatMul.
const char* CudaErrorString(int error);

}  // namespace Cuda
}  // namespace qcompiler
