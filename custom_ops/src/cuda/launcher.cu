// The SpQRMatMul CUDA launcher (spqr_matmul_cuda_impl.cuh): which kernel takes a call (kernels.cuh), the decode
// GEMV's rows per warp and the prefill kernel's tile (cost models: estimates, docs/kernels.md), scratch size.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "common/spqr_format.h"
#include "cuda/kernels.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

// Streaming multiprocessors of the current device (cached per device); 0 when it cannot be asked.
int MultiprocessorCount() {
  static std::atomic<int> count[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    (void)cudaGetLastError();
    return 0;
  }
  int c = count[device].load(std::memory_order_relaxed);
  if (c == 0) {
    if (cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    count[device].store(c, std::memory_order_relaxed);
  }
  return c;
}

// The decode GEMV's cost model for its rows per warp (an estimate from static instruction counts, not a timing):
// time ~ (blocks on the busiest SM) x (instructions of one block per 1024 columns of K) / (the SM's issue
// efficiency), where a block of R rows per warp costs kGemvSlabInstr (the slab loop of one lane, R x 32 weights;
// bench/cuda_sass.py, sm_90, fp16 X, 3 bits, group 16, 3-bit statistics; tests/test_cuda_sass.py holds the table
// within 10 % of the compiled code) plus ~kGemvStageInstr per row of X (its X staging: 4 columns per thread, perm
// gather, fp32 store, half-chunk sums), and an SM is taken to need kGemvSaturatingWarps resident warps to hide its
// load latency (fewer: proportionally slower).
constexpr int kGemvSlabInstr[4][3] = {  // [MT = 1, 2, 4, 8][R = 1, 2, 4]; 0: not offered
    {261, 404, 654}, {0, 495, 842}, {415, 668, 0}, {605, 1013, 0}};
constexpr int kGemvStageInstr = 45;
constexpr int kGemvSaturatingWarps = 16;


}  // namespace

int GemvRowsPerWarp(int64_t M, int64_t N, int sms) {
  const int mt = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  const int mt_index = mt == 1 ? 0 : mt == 2 ? 1 : mt == 4 ? 2 : 3;
  const int most = GemvRowsMost(mt);
  if (sms <= 0 || N <= 0) return most;
  const int per_sm = GemvMinBlocks(mt);  // the blocks per SM registers and the X budget are set for
  int best = most;
  double best_time = 0.0;
  for (int r = most; r >= 1; r /= 2) {  // most first: it wins ties
    if (!GemvOffers(mt, r)) continue;
    const int64_t blocks = (N + kGemvWarps * r - 1) / (kGemvWarps * r);
    const double busiest = static_cast<double>((blocks + sms - 1) / sms);
    const double resident = std::min(static_cast<double>(blocks) / sms, static_cast<double>(per_sm)) * kGemvWarps;
    const double efficiency = std::min(1.0, resident / kGemvSaturatingWarps);
    const double time = busiest * (kGemvSlabInstr[mt_index][r == 1 ? 0 : r == 2 ? 1 : 2] + kGemvStageInstr * mt) /
                        efficiency;
    if (r == most || time < best_time) best = r, best_time = time;
  }
  return best;
}

bool PrefillUsesLargeTile(int64_t M, int64_t N, int sms) {
  if (M <= PrefillSmall::M) return false;  // one row of small tiles: the large one would only add padding
  // the large tile where its grid still gives every SM a block (an estimate: W decoded half as often per row of X,
  // against fewer, bigger blocks)
  const int64_t blocks =
      ((M + PrefillLarge::M - 1) / PrefillLarge::M) * ((N + PrefillLarge::N - 1) / PrefillLarge::N);
  return sms <= 0 || blocks >= sms;
}

namespace {

// Scratch bytes of the prefill's permuted X (0: none), and where the activation's Z starts (256-byte aligned).
size_t PrefillScratchBytes(const SpQRMatMulArgs& args) {
  return UsesPrefill(args) && args.perm != nullptr ? static_cast<size_t>(args.M * args.K) * sizeof(uint16_t) : 0;
}
size_t ActivationScratchOffset(const SpQRMatMulArgs& args) { return (PrefillScratchBytes(args) + 255) / 256 * 256; }

int LaunchProduct(const SpQRMatMulArgs& args, const env::CudaSwitches& switches, cudaStream_t s);

}  // namespace

size_t ScratchBytes(const SpQRMatMulArgs& args) {
  if (args.activation == spqr::kActivationNone) return PrefillScratchBytes(args);
  return ActivationScratchOffset(args) + static_cast<size_t>(args.M * args.N) * (args.x_is_half ? 2 : 4);
}

int LaunchSpQRMatMul(const SpQRMatMulArgs& args, const env::CudaSwitches& switches, void* stream) {
  if (args.M == 0 || args.N == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.activation == spqr::kActivationNone) return LaunchProduct(args, switches, s);
  if (args.activation != spqr::kActivationSiluMul || args.N % 2 != 0 || args.scratch == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  SpQRMatMulArgs product = args;  // Z [M, N] into scratch, then Y from it
  product.y = static_cast<char*>(args.scratch) + ActivationScratchOffset(args);
  const int err = LaunchProduct(product, switches, s);
  if (err != 0) return err;
  LaunchSiluMul(product.y, args.y, args.M, args.N, args.x_is_half, s);
  return static_cast<int>(cudaGetLastError());
}

namespace {

int LaunchProduct(const SpQRMatMulArgs& args, const env::CudaSwitches& switches, cudaStream_t s) {
  // the kernels divide in 32 bits (Div); the decode GEMV counts columns in int up to a slab past K
  constexpr int64_t kMax32 = (int64_t{1} << 31) - 1;
  if (args.K + kSlab > kMax32 || args.N + 32 > kMax32 || args.M * args.K > (int64_t{1} << 40)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // the decode GEMV: its group sizes, and statistics arrays it can index with 32-bit offsets (GroupStatsRows)
  const int64_t groups = (args.K + args.group_size - 1) / args.group_size;
  const int64_t stat_bytes = groups * (args.stat_bits ? spqr::PackedRowBytes(args.N, args.stat_bits) : args.N * 2);
  const int64_t stats2_bytes =
      args.stat_bits ? groups * ((args.N + args.stat_group_size - 1) / args.stat_group_size) * 8 : 0;
  const bool gemv_groups = (args.group_size == 16 || args.group_size % 32 == 0) && stat_bytes < (int64_t{1} << 31) &&
                           stats2_bytes < (int64_t{1} << 31);
  if (UsesPrefill(args)) {  // (2..4-bit codes, as the decode GEMV; 8-bit codes: the generic rows kernel)
    const bool large = switches.prefill_tile != 0 ? switches.prefill_tile == 128
                                                  : PrefillUsesLargeTile(args.M, args.N, MultiprocessorCount());
    const int err = LaunchPrefill(args, large, s);
    if (err != 0) return err;
  } else if (args.bits <= 4 && args.M <= kGemvMaxRows && gemv_groups) {
    // QCOMPILER_CUDA_GEMV_ROWS where the tile offers it, else the cost model's choice
    const int mt = args.M <= 1 ? 1 : args.M <= 2 ? 2 : args.M <= 4 ? 4 : 8;
    int r = switches.gemv_rows;
    if (r == 0 || !GemvOffers(mt, r)) r = GemvRowsPerWarp(args.M, args.N, MultiprocessorCount());
    LaunchGemv(args, r, switches.gemv_x, s);
  } else {
    LaunchGenericRows(args, s);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

const char* CudaErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace Cuda
}  // namespace qcompiler
