// SpQRMatMul CUDA device code. Decode and small batches, and fp32 X: one warp per output row n, decoding W on the
// fly (SpQRMatMulKernel). Prefill with fp16 X (M >= kPrefillMinRows): tensor cores (SpQRMatMulPrefillKernel).
//
// Lane l of the warp owns column 32c + l of every 32-code chunk c: it extracts its code from the chunk (all lanes
// read the same 4*bits bytes), applies its group's (scale, zero) (bilevel statistics decoded in place), gathers
// X[m, perm[k]] directly (no permuted copy of X) and accumulates up to kMTile rows of X at once in fp32. Outliers are
// added by striding the row's CSR entries over the lanes; a warp shuffle reduction finishes the dot products.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "common/spqr_format.h"
#include "cuda/launch.cuh"
#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMTile = 8;  // rows of X accumulated per pass over W's row
constexpr int64_t kPrefillMinRows = 32;  // fp16 X with at least this many rows: the tensor-core prefill kernel

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

__device__ __forceinline__ float BiasOf(const SpQRMatMulArgs& a, int64_t n) {
  if (a.bias == nullptr) return 0.f;
  return a.bias_is_half ? Half(static_cast<const uint16_t*>(a.bias)[n]) : static_cast<const float*>(a.bias)[n];
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
  const float bias = BiasOf(a, n);
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

// ---- prefill (fp16 X, M >= kPrefillMinRows): 64 x 64 output tiles on tensor cores ----
//
// Per 32-column chunk a block stages X's 64 rows (read through perm, so in stored column order) and W's 64 rows
// decoded to fp16 in shared memory: the first-level statistics of the chunk's (at most two) groups are decoded once
// per row, the codes per element, the row's outliers that fall in the chunk added into the tile. Four warps each
// accumulate a 32 x 32 quarter in fp32 (2 x 2 WMMA 16x16x16 fragments); the epilogue adds the bias and rounds to
// fp16 once. W is decoded once per 64 rows of X.
constexpr int kTileM = 64, kTileN = 64, kTileK = spqr::kChunk, kTilePad = 8;
constexpr int kPrefillThreads = 128;

__global__ void __launch_bounds__(kPrefillThreads) SpQRMatMulPrefillKernel(const SpQRMatMulArgs a) {
  using namespace nvcuda;
  __shared__ __align__(32) __half xs[kTileM][kTileK + kTilePad];
  __shared__ __align__(32) __half ws[kTileN][kTileK + kTilePad];
  __shared__ __align__(32) float out[kTileM][kTileN + 4];
  __shared__ float st_s[kTileN][2], st_z[kTileN][2];

  const __half* __restrict__ x = static_cast<const __half*>(a.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, a.bits);
  const int64_t chunks = (a.K + kTileK - 1) / kTileK;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.f);

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kTileK;
    // statistics of the chunk's groups: (row r, group k0 / gs + i) for i = 0, 1
    {
      const int r = threadIdx.x >> 1, i = threadIdx.x & 1;
      const int64_t n = n0 + r, g = k0 / a.group_size + i;
      float s = 0.f, z = 0.f;
      if (n < a.N && g * a.group_size < a.K) GroupStats(a, g, n, s, z);
      st_s[r][i] = s;
      st_z[r][i] = z;
    }
    for (int e = threadIdx.x; e < kTileM * kTileK; e += kPrefillThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const int64_t m = m0 + r, k = k0 + kk;
      __half v = __float2half(0.f);
      if (m < a.M && k < a.K) v = x[m * a.K + (a.perm ? a.perm[k] : k)];
      xs[r][kk] = v;
    }
    __syncthreads();
    const int64_t g0 = k0 / a.group_size;
    for (int e = threadIdx.x; e < kTileN * kTileK; e += kPrefillThreads) {
      const int r = e / kTileK, kk = e % kTileK;
      const int64_t n = n0 + r, k = k0 + kk;
      float w = 0.f;
      if (n < a.N && k < a.K) {
        const int i = static_cast<int>(k / a.group_size - g0);  // 0 or 1 (group_size 16 or >= 32)
        w = st_s[r][i] * (static_cast<float>(spqr::ExtractCode(a.qweight + n * row_bytes, a.bits, k)) - st_z[r][i]);
      }
      ws[r][kk] = __float2half(w);
    }
    __syncthreads();
    if (a.row_ptr != nullptr && threadIdx.x < kTileN) {  // the tile rows' outliers in this chunk, a thread per row
      const int64_t n = n0 + threadIdx.x;
      if (n < a.N) {
        for (int32_t p = a.row_ptr[n]; p < a.row_ptr[n + 1]; ++p) {
          const int64_t j = a.col_idx[p];
          if (j >= k0 && j < k0 + kTileK) {
            __half& t = ws[threadIdx.x][j - k0];
            t = __float2half(__half2float(t) + Half(a.values[p]));
          }
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];  // B[k][n] = ws[n][k]
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], &xs[wm * 32 + i * 16][kk], kTileK + kTilePad);
        wmma::load_matrix_sync(fb[i], &ws[wn * 32 + i * 16][kk], kTileK + kTilePad);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&out[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kTileN + 4, wmma::mem_row_major);
  __syncthreads();
  __half* __restrict__ y = static_cast<__half*>(a.y);
  for (int e = threadIdx.x; e < kTileM * kTileN; e += kPrefillThreads) {
    const int r = e / kTileN, col = e % kTileN;
    const int64_t m = m0 + r, n = n0 + col;
    if (m >= a.M || n >= a.N) continue;
    y[m * a.N + n] = __float2half_rn(out[r][col] + BiasOf(a, n));
  }
}

}  // namespace

int LaunchSpQRMatMul(const SpQRMatMulArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return static_cast<int>(cudaSuccess);
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((args.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // a 32-column chunk must meet at most two groups: group_size 16 or >= 32
  if (args.x_is_half && args.M >= kPrefillMinRows && (args.group_size == 16 || args.group_size >= 32)) {
    const dim3 pgrid(static_cast<unsigned>((args.N + kTileN - 1) / kTileN),
                     static_cast<unsigned>((args.M + kTileM - 1) / kTileM));
    QC_LAUNCH(SpQRMatMulPrefillKernel, pgrid, dim3(kPrefillThreads), s, args);
  } else if (args.x_is_half) {
    QC_LAUNCH(SpQRMatMulKernel<__half>, grid, block, s, args);
  } else {
    QC_LAUNCH(SpQRMatMulKernel<float>, grid, block, s, args);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* CudaErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace Cuda
}  // namespace qcompiler
