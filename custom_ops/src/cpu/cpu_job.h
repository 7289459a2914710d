// What the CPU kernel's ParallelFor tasks share (Job), their tunables and the tasks themselves: the portable ones
// (portable.cc: row, GEMV and GEMM paths on the stored layout) and the drivers of the packed paths (packed_tasks.cc),
// which call the ISA kernels a CpuKernels table (cpu_kernels.h) holds. The op (spqr_matmul_cpu.cc) picks the path and
// fills the Job. Internal to the CPU kernel.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/spqr_op.h"
#include "cpu/clones.h"
#include "cpu/gemv_avx512.h"
#include "cpu/packed.h"

namespace qcompiler {
namespace Cpu {

// fp16 bits -> fp32, exact. With a compiler half type one instruction where the target has it (F16C in the AVX2
// clones, FCVT on aarch64): ARM's __fp16 on aarch64 (GCC before 13 has no _Float16 in C++ there), _Float16 where
// the compiler offers it, else ORT's bit conversion.
inline float HalfToFloat(uint16_t bits) {
#if defined(__aarch64__) && defined(__GNUC__)
  __fp16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
#elif defined(__FLT16_MAX__)
  _Float16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
#else
  return Ort::Float16_t::FromBits(bits).ToFloat();
#endif
}


// Rows of W decoded together; each X row is loaded once per block and multiplied with all of them.
constexpr int kRowBlock = 4;

// The smallest M that takes the GEMM path (portable.cc).
constexpr int64_t kGemmMinRows = 8;

// GEMV path: W rows per task (= spqr::kChunk, so a task's packed statistics are whole chunks).
constexpr int64_t kGemvRows = spqr::kChunk;

// Everything one ParallelFor task needs (read-only, shared by all tasks).
struct Job {
  using Attributes = spqr::Attributes;
  Attributes a;
  int64_t M = 0;
  int64_t rows_per_task = 1;
  const uint8_t* qweight = nullptr;
  const void* scales = nullptr;  // fp16 [G, N] or packed uint8 [G, ceil(N/32)*4*stat_bits]
  const void* zeros = nullptr;
  const uint16_t* stats2 = nullptr;  // fp16 [G, N2, 4]
  const int32_t* row_ptr = nullptr;  // nullptr: no outliers
  const uint16_t* col_idx = nullptr;
  const uint16_t* values = nullptr;
  const float* bias_f32 = nullptr;
  const uint16_t* bias_f16 = nullptr;
  const float* xp = nullptr;  // [M, xstride] fp32, permuted to stored column order (GEMV: LanePos), zero past K
  int64_t xstride = 0;        // K rounded up to whole chunks
  bool lane_x = false;        // xp in the portable GEMV's lane order (LanePos)
  GemvRowAvx512Fn row512 = nullptr;  // GEMV rows by the AVX-512 kernel (xp in stored order), else portable
  // Packed path: X in slices of packed_rows[i] rows, each by packed_fns[i]; the kernels' per-call inputs
  // (args.y unset, xs / xg for all M rows).
  const int64_t* packed_rows = nullptr;
  const PackedGemvFn* packed_fns = nullptr;
  size_t packed_slices = 0;
  int64_t packed_task_blocks = 0;
  int64_t packed_xs_row = 0;  // floats of the x table per row of X
  int64_t packed_xq_row = 0, packed_xd_row = 0;  // int8 path: words of xq / scales of xd per row of X
  const float* xt = nullptr;  // packed path with outliers and M >= kTransposeMinRows: X transposed, [K, M]
  PackedGemvArgs packed;
  PackedOutlierRowsFn outlier_rows = nullptr;  // packed path: the F16C version (else OutlierDot per row)
  PackedDecodeFn packed_decode = nullptr;     // packed prefill path: the block decoder and micro-kernels by rows
  PackedMicroFn packed_micro[kGemmRowsMax + 1] = {};
  HalvesToFloatsFn halves_to_floats = nullptr;  // packed paths: the outliers' values, vectorized (or nullptr)
  int64_t gemm_blocks = 1;
  float* y_f32 = nullptr;     // exactly one of y_f32 / y_f16
  uint16_t* y_f16 = nullptr;
};

inline float BiasOf(const Job& j, int64_t n) {
  return j.bias_f32 ? j.bias_f32[n] : (j.bias_f16 ? HalfToFloat(j.bias_f16[n]) : 0.f);
}

inline void Store(const Job& j, int64_t m, int64_t n, float y) {
  if (j.y_f32) {
    j.y_f32[m * j.a.N + n] = y;
  } else {
    j.y_f16[m * j.a.N + n] = Ort::Float16_t(y).val;
  }
}

// ---- portable paths (portable.cc): ParallelFor tasks over a const Job* ----
void RowBlockTask(void* user, size_t task);  // rows: decode kRowBlock rows of W, dot them with each X row
void GemvTask(void* user, size_t task);      // GEMV (M < kGemmMinRows, group_size % 8 == 0)
void TileTask(void* user, size_t task);      // GEMM (M >= kGemmMinRows)

// sum of row n's outliers times x (x in the GEMV path's order, see Job::lane_x).
float OutlierDot(const Job& j, int64_t n, const float* x);
// Outlier values [q0, q1) as fp32 in a thread-local buffer (valid until the next call on this thread).
const float* OutlierValues(const Job& j, int32_t q0, int32_t q1);
// Rows [m0, m1) of X -> fp32 in stored column order (lane order for the portable GEMV), zero past K.
void ConvertXRows(const void* x, bool half_x, const int32_t* perm, int64_t K, int64_t xstride, bool lane_x,
                  float* xp, int64_t m0, int64_t m1);

// ---- packed paths (packed_tasks.cc) ----
// Packed path, one task = Job::packed_task_blocks blocks of 16 rows of W for all M rows of X, in slices of at
// most kPackedMaxRows rows: the slices run one after the other over the task's packed codes, so with several
// slices a task takes about kPackTaskBytes of codes (they stay in L2 while each slice's x table streams past).
constexpr int64_t kPackTaskBlocks = 2;
constexpr int64_t kTransposeMinRows = 4;
constexpr int64_t kPackTaskBytes = 384 * 1024;
constexpr int64_t kPackTaskMaxBlocks = 64;
void PackedTask(void* user, size_t task);

// Packed prefill path, one task = Job::gemm_blocks blocks of 16 rows of W for all M rows of X, in steps of
// kPackedGemmKc columns: each step decodes the blocks' columns (outliers added in), then every kGemmRowsMax-row
// panel of X (in L1) meets all the blocks' tiles (in L2), so X streams from memory once per task, not per block.
constexpr int64_t kPackedGemmKc = 128;

// GEMM or slices of the GEMV: measured (bench/kernels.py, 2-core Zen 4) the GEMM wins from 16 rows of X on the
// SmolLM2 shapes (576x1536: 208 vs 270 us) and from 32 rows on 4096x11008 (M = 16: 12.3 vs 9.6 ms, where the
// slices' decode-in-registers beats writing a tile per block; M = 64: 33 vs 38 ms).
inline bool UsePackedGemm(int64_t M, int64_t K, int64_t N) {
  return M >= 32 || (M >= 16 && K * N <= (int64_t{1} << 23));
}
constexpr int64_t kPackedGemmMaxBlocks = 8;
void PackedGemmTask(void* user, size_t task);

// X -> fp32 in stored column order for the packed prefill path, kConvertRows rows per task.
constexpr int64_t kConvertRows = 16;
struct ConvertJob {
  const void* x;
  bool half_x;
  const int32_t* perm;
  int64_t K, xstride;
  float* xp;
  int64_t M;
};
void ConvertTask(void* user, size_t task);

// The packed path's per-call inputs, built by one task per slice of X rows (X conversion, x tables, transposed X).
struct PackedPrep {
  const void* x = nullptr;
  bool half_x = false;
  const int32_t* perm = nullptr;
  int64_t K = 0, M = 0, xstride = 0;
  float* xp = nullptr;
  const PackedWeights* pw = nullptr;
  const int64_t* slice_rows = nullptr;
  const int64_t* slice_begin = nullptr;
  int32_t* xq = nullptr;  // int8 path: xq [M * xq_row], xd [M * xd_row], written by int8_inputs
  PackedInt8InputsFn int8_inputs = nullptr;
  float* xd = nullptr;
  float* xs = nullptr;  // fp32 path: xs [M * xs_row]
  float* xg = nullptr;  // [M * G]
  int64_t xq_row = 0, xd_row = 0, xs_row = 0;
  float* xt = nullptr;  // [K, M], or nullptr
};
void PackedPrepTask(void* user, size_t i);

}  // namespace Cpu
}  // namespace qcompiler
