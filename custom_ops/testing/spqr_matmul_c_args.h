// SpQRMatMulArgs from the flat argument list of the library-free C entries (ctypes can check a flat signature, not a
// struct layout): the emulated kernels' (custom_ops/testing/emu/spqr_matmul_emu.cc) and the direct GPU runs'
// (custom_ops/testing/spqr_matmul_cuda_direct.cc). Tests and benchmarks only; ONNX Runtime binds the kernel through
// spqr_matmul_cuda.cc.
#pragma once

#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {

inline SpQRMatMulArgs MakeArgs(int64_t M, int64_t K, int64_t N, int bits, int64_t group_size, int stat_bits,
                               int64_t stat_group_size, const void* x, int x_is_half, const uint8_t* qweight,
                               const void* scales, const void* zeros, const uint16_t* stats2, const int32_t* row_ptr,
                               const uint16_t* col_idx, const uint16_t* values, const int32_t* perm, const void* bias,
                               int bias_is_half, int activation, void* y) {
  SpQRMatMulArgs a;
  a.M = M;
  a.K = K;
  a.N = N;
  a.bits = bits;
  a.group_size = group_size;
  a.stat_bits = stat_bits;
  a.stat_group_size = stat_group_size;
  a.x = x;
  a.x_is_half = x_is_half != 0;
  a.qweight = qweight;
  a.scales = scales;
  a.zeros = zeros;
  a.stats2 = stats2;
  a.row_ptr = row_ptr;
  a.col_idx = col_idx;
  a.values = values;
  a.perm = perm;
  a.bias = bias;
  a.bias_is_half = bias_is_half != 0;
  a.activation = activation;
  a.y = y;
  return a;
}

}  // namespace Cuda
}  // namespace qcompiler
