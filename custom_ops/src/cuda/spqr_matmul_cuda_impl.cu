// SpQRMatMul CUDA device code: one warp per output row n, decoding W on the fly.
//
// Lane l of the warp owns column 32c + l of every 32-code chunk c: it extracts its code from the chunk (all lanes
// read the same 4*bits bytes), applies its group's (scale, zero) (bilevel statistics decoded in place), gathers
// X[m, perm[k]] directly (no permuted copy of X) and accumulates up to kMTile rows of X at once in fp32. Outliers are
// added by striding the row's CSR entries over the lanes; a warp shuffle reduction finishes the dot products.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/spqr_format.h"
#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMTile = 8;  // rows of X accumulated per pass over W's row

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ float Half(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// First-level (scale, zero) of (group g, row n).
__device__ __forceinline__ void GroupStats(const SpQRMatMulArgs& a, int64_t g, int64_t n, float& s, float& z) {
  if (a.stat_bits == 0) {
    s = Half(static_cast<const uint16_t*>(a.scales)[g * a.N + n]);
    z = Half(static_cast<const uint16_t*>(a.zeros)[g * a.N + n]);
    return;
  }
  const int64_t row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
  const int64_t n2 = (a.N + a.stat_group_size - 1) / a.stat_group_size;
  const uint16_t* st = a.stats2 + (g * n2 + n / a.stat_group_size) * 4;
  const float sc = static_cast<float>(spqr::ExtractCode(static_cast<const uint8_t*>(a.scales) + g * row_bytes, a.stat_bits, n));
  const float zc = static_cast<float>(spqr::ExtractCode(static_cast<const uint8_t*>(a.zeros) + g * row_bytes, a.stat_bits, n));
  s = Half(st[0]) * (sc - Half(st[1]));
  z = Half(st[2]) * (zc - Half(st[3]));
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) SpQRMatMulKernel(const SpQRMatMulArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= a.N) return;  // whole warp exits together

  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const uint8_t* qrow = a.qweight + n * spqr::PackedRowBytes(a.K, a.bits);
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  float bias = 0.f;
  if (a.bias != nullptr) {
    bias = a.bias_is_half ? Half(static_cast<const uint16_t*>(a.bias)[n]) : static_cast<const float*>(a.bias)[n];
  }
  const int32_t p_begin = a.row_ptr ? a.row_ptr[n] : 0;
  const int32_t p_end = a.row_ptr ? a.row_ptr[n + 1] : 0;

  for (int64_t m0 = 0; m0 < a.M; m0 += kMTile) {
    const int mt = static_cast<int>(min(static_cast<int64_t>(kMTile), a.M - m0));
    const T* xm = x + m0 * a.K;
    float acc[kMTile];
#pragma unroll
    for (int i = 0; i < kMTile; ++i) acc[i] = 0.f;

    int64_t cur_g = -1;
    float s = 0.f, z = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = c * spqr::kChunk + lane;
      if (k >= a.K) break;
      const int64_t g = k / a.group_size;
      if (g != cur_g) {
        GroupStats(a, g, n, s, z);
        cur_g = g;
      }
      const float w = s * (static_cast<float>(spqr::ExtractCode(qrow, a.bits, k)) - z);
      const int64_t col = a.perm ? a.perm[k] : k;
#pragma unroll
      for (int i = 0; i < kMTile; ++i) {
        if (i < mt) acc[i] += w * ToFloat(xm[i * a.K + col]);
      }
    }
    for (int32_t p = p_begin + lane; p < p_end; p += 32) {
      const int64_t j = a.col_idx[p];
      const int64_t col = a.perm ? a.perm[j] : j;
      const float v = Half(a.values[p]);
#pragma unroll
      for (int i = 0; i < kMTile; ++i) {
        if (i < mt) acc[i] += v * ToFloat(xm[i * a.K + col]);
      }
    }
#pragma unroll
    for (int i = 0; i < kMTile; ++i) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
    if (lane == 0) {
      for (int i = 0; i < mt; ++i) Store(y + (m0 + i) * a.N + n, acc[i] + bias);
    }
  }
}

}  // namespace

int LaunchSpQRMatMul(const SpQRMatMulArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return static_cast<int>(cudaSuccess);
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((args.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.x_is_half) {
    SpQRMatMulKernel<__half><<<grid, block, 0, s>>>(args);
  } else {
    SpQRMatMulKernel<float><<<grid, block, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* CudaErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace Cuda
}  // namespace qcompiler
