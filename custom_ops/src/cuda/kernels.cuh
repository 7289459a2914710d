// What the SpQRMatMul CUDA launcher (launcher.cu) knows of its kernels: their shapes (the facts its cost model and
// its checks use) and one launch function per kernel file. Plain host C++ plus cudaStream_t.
// - decode_gemv.cu: the decode GEMV (M <= kGemvMaxRows, group_size 16 or a multiple of 32), a lane per 32-code chunk;
// - prefill.cu: the tensor-core prefill (fp16 X, M >= kPrefillMinRows), X permuted once into scratch;
// - generic_rows.cu: everything else (fp32 X with M > 8, other group sizes), one warp per output row;
// - activation.cu: the `activation` attribute's epilogue, after any of them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/env_switches.h"
#include "common/spqr_format.h"
#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {

// ---- generic row kernel (generic_rows.cu) ----
constexpr int kWarpsPerBlock = 4;
constexpr int kMTile = 8;  // rows of X accumulated per pass over W's row

// Enqueues the row kernel for `a` (X float or half).
void LaunchGenericRows(const SpQRMatMulArgs& a, cudaStream_t s);

// ---- decode GEMV (decode_gemv.cu) ----
constexpr int kGemvWarps = 8;
constexpr int kSlabChunks = 32;  // one chunk per lane
constexpr int kSlab = kSlabChunks * spqr::kChunk;
constexpr int64_t kGemvMaxRows = 8;
// xs row stride in floats: 36 = 9 x 16 bytes, odd, so that a quarter warp's 16-byte loads of 8 chunks hit 8
// different bank groups
constexpr int kXsStride = spqr::kChunk + 4;

// Rows per warp (R): the launcher's choice among those GemvOffers (GemvRowsPerWarp). The most (4 at MT <= 2, 2 at
// MT >= 4 so that the per-row sums stay in registers) share the most per weight — the X loads of a chunk, the
// statistics' loads, the block's X staging — but give N / (32 R) blocks: fewer rows per warp where that leaves SMs
// idle or under-occupied (N = 4096 at M = 1: 128 blocks of 4 rows per warp for 132 SMs).
constexpr int GemvRowsMost(int mt) { return mt >= 4 ? 2 : 4; }
// Rows per warp a tile of MT rows of X offers: its most, half that, and 1 at MT = 1 (decode proper).
constexpr bool GemvOffers(int mt, int r) {
  return r == GemvRowsMost(mt) || r == GemvRowsMost(mt) / 2 || (mt == 1 && r == 1);
}

// Blocks per SM the register budget is set for: two (128 registers per thread), one at MT = 8 (whose 2 x 8 x 2 sums
// and 2 x 8 accumulators spill at 128).
constexpr int GemvMinBlocks(int mt) { return mt >= 8 ? 1 : 2; }

// Enqueues the decode GEMV for `a` (M <= kGemvMaxRows) with `rows_per_warp` (GemvRowsPerWarp's choice, or a count
// its tile offers) and X staged as `switches.gemv_x` asks where that fits (else its own choice).
void LaunchGemv(const SpQRMatMulArgs& a, int rows_per_warp, env::GemvX gemv_x, cudaStream_t s);

// ---- prefill (prefill.cu) ----
// fp16 X with at least this many rows: the tensor-core prefill kernel. From 9 rows (past the decode GEMV's 8): it
// decodes each weight once per 64 rows of X, where the row kernel spends ~3x its instructions at 16 rows (an
// estimate from instruction counts, not a timing).
constexpr int64_t kPrefillMinRows = 9;

template <int TM, int TN, int WM, int WN>
struct PrefillTile {
  static constexpr int M = TM, N = TN, kWarpsM = WM, kWarpsN = WN, kThreads = 32 * WM * WN;
  static constexpr int kFragsM = TM / WM / 16, kFragsN = TN / WN / 16;  // per warp
  static_assert(kThreads == 2 * TN, "two threads per tile row load its statistics (one per group)");
  static_assert(TN * 8 % kThreads == 0 && kFragsM * WM * 16 == TM && kFragsN * WN * 16 == TN, "tile shape");
};
using PrefillSmall = PrefillTile<64, 64, 2, 2>;
using PrefillLarge = PrefillTile<128, 128, 2, 4>;

// Whether the prefill kernel takes `a` (a 32-column chunk must meet at most two groups).
inline bool UsesPrefill(const SpQRMatMulArgs& a) {
  return a.x_is_half && a.bits <= 4 && a.M >= kPrefillMinRows && (a.group_size == 16 || a.group_size >= 32);
}

// Enqueues the prefill kernel for `a` with its large tile (PrefillLarge) or its small one, after permuting X's
// columns into a.scratch when perm is present. Returns a cudaError_t value (cudaErrorInvalidValue: no scratch).
int LaunchPrefill(const SpQRMatMulArgs& a, bool large_tile, cudaStream_t s);

// ---- activation epilogue (activation.cu) ----
// Enqueues Y [M, N/2] = silu(Z[:, :N/2]) · Z[:, N/2:] for Z [M, N] (fp16 when `half`, else fp32).
void LaunchSiluMul(const void* z, void* y, int64_t M, int64_t N, bool half, cudaStream_t s);

}  // namespace Cuda
}  // namespace qcompiler
