// Kernels with known faults, so that tests/test_cuda_emu.py can check that the emulation (cuda_emu.h) reports each
// kind it claims to: a missing __syncthreads (a wrong result for some fiber order), __syncthreads after an early
// return, a warp collective reached by half a warp, a misaligned WMMA tile; and that __syncwarp orders a warp's
// shared-memory writes before its reads, and fails when half a warp or a partial mask reaches it.
#include <cstring>

#include "cuda/launch.cuh"
#include "cuda_emu.h"
#include "mma.h"

namespace {

constexpr int kThreads = 64;

// out[t] = value written by thread t + 1 (mod 64) of this launch; `sync` puts the barrier between write and read
__global__ void NeighbourKernel(int* out, int tag, bool sync) {
  __shared__ int s[kThreads];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = tag * kThreads + t;
  if (sync) __syncthreads();
  out[t] = s[(t + 1) % kThreads];
}

__global__ void EarlyReturnKernel(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void HalfWarpShuffleKernel(int* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// out[t] = value written by lane t + 1 (mod 32) of t's warp, read after __syncwarp (a partial `mask` or only the
// lanes below `lanes` reaching it: faults)
__global__ void WarpNeighbourKernel(int* out, int tag, unsigned mask, int lanes) {
  __shared__ int s[kThreads];
  const int t = static_cast<int>(threadIdx.x), lane = t & 31;
  s[t] = tag * kThreads + t;
  if (lane < lanes) __syncwarp(mask);
  out[t] = s[(t & ~31) + (lane + 1) % 32];
}

__global__ void MisalignedWmmaKernel(int* out) {
  __shared__ __align__(32) __half tile[16 * 16 + 8];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 4, 16);  // 8 bytes past a 32-byte boundary
  out[threadIdx.x] = 1;
}

int Finish(char* message, size_t bytes) {
  const int err = static_cast<int>(cudaGetLastError());
  std::strncpy(message, err ? qcompiler::emu::LastErrorMessage() : "", bytes - 1);
  message[bytes - 1] = '\0';
  return err;
}

}  // namespace

extern "C" {

// which: 0 neighbour read with the barrier, 1 without it, 2 early return, 3 half-warp shuffle, 4 misaligned WMMA,
// 5 warp neighbour read after __syncwarp, 6 __syncwarp reached by half a warp, 7 __syncwarp with a partial mask.
// Fills out[64]; returns the launch's cudaError_t value and its message.
__attribute__((visibility("default"))) int qc_emu_selftest(int which, unsigned seed, int tag, int* out, char* message,
                                                          size_t message_bytes) {
  qcompiler::emu::ScheduleSeed() = seed;
  const dim3 grid(1), block(kThreads);
  cudaStream_t s = nullptr;
  switch (which) {
    case 0:
    case 1:
      QC_LAUNCH(NeighbourKernel, grid, block, 0, s, out, tag, which == 0);
      break;
    case 2:
      QC_LAUNCH(EarlyReturnKernel, grid, block, 0, s, out);
      break;
    case 3:
      QC_LAUNCH(HalfWarpShuffleKernel, grid, block, 0, s, out);
      break;
    case 5:
    case 6:
    case 7:
      QC_LAUNCH(WarpNeighbourKernel, grid, block, 0, s, out, tag, which == 7 ? 0xffffu : 0xffffffffu,
                which == 6 ? 16 : 32);
      break;
    default:
      QC_LAUNCH(MisalignedWmmaKernel, grid, block, 0, s, out);
      break;
  }
  return Finish(message, message_bytes);
}

}  // extern "C"
