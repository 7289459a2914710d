// AVX-512 row kernel of the CPU GEMV path (x86-64 only; chosen at run time, see spqr_matmul_cpu.cc).
#pragma once

#include <cstdint>

namespace qcompiler {
namespace Cpu {

// What one packed row's dot products need. X is in stored column order (not the portable path's lane order).
struct GemvRowArgs {
  const float* x = nullptr;  // [M, xstride], zero past K
  int64_t xstride = 0;
  int64_t K = 0;
  int64_t group_size = 0;   // a multiple of 16
  int64_t stats_stride = 0;  // distance between consecutive groups' statistics in s / z
};

// y[m] += sum over groups [g0, g1) of sum_k s_g * (q_k - z_g) * x[m, k], for the packed row `qrow`.
using GemvRowAvx512Fn = void (*)(const GemvRowArgs& args, const uint8_t* qrow, int64_t g0, int64_t g1,
                                 const float* s, const float* z, float* y);

// The kernel for `bits` (2, 3, 4) and M rows of X (1..7), or nullptr where this build or CPU has no AVX-512
// (F, BW, VL, DQ).
GemvRowAvx512Fn GemvRowAvx512(int64_t bits, int64_t M);

}  // namespace Cpu
}  // namespace qcompiler
