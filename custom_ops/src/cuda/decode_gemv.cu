// SpQRMatMul CUDA decode GEMV (M <= 8, group_size 16 or a multiple of 32; docs/kernels.md) and its launch: a lane
// per 32-code chunk, X staged in shared memory.
#include "cuda/device_common.cuh"

#include <algorithm>
#include <atomic>

namespace qcompiler {
namespace Cuda {
namespace {

// ---- decode GEMV (M <= 8, group_size 16 or a multiple of 32): a lane per 32-code chunk ----
//
// X lives in shared memory as fp32 in stored column order (read through perm), laid out xs[m][c][i] for element
// 32c + i with rows padded to 36 floats (lane c reads its chunk four values per 16-byte load without bank
// conflicts), next to the sums of each chunk's two 16-column halves (GemvMode):
// - kXResident, whenever it fits (M = 1 up to K ~ 24k on H100-class parts): all of X, staged once per block; the
//   warps then run through K with no further barriers;
// - otherwise per slab of 1024 columns, staged between barriers, gathering through perm from global memory
//   (kXSlabs) or, when X's rows fit, from a copy of them in shared memory (kXSlabsRows).
// Lane c of a warp owns chunk c of each slab for the warp's R rows (GemvRowsPerWarp): it loads the chunk's 4*bits bytes
// with one to three vector loads one slab ahead (the next slab's loads in flight while this one is computed),
// decodes the codes four at a time (byte lanes of a 32-bit word, each turned into the float 1/2 + q/256 by one byte
// permute: CodeAsFloat), and for each group segment g of the chunk (one, or two halves at group_size 16) adds
//   s_g * (sum_i q_i x_i - z_g * sum_i x_i)
// so that the statistics cost two multiplies per segment, not per weight. Outliers follow, then one shuffle
// reduction per row. Consecutive rows per block share their statistics' cache lines.

template <int BITS>
struct ChunkWords {
  uint32_t w[BITS];
};

template <int BITS>
__device__ __forceinline__ ChunkWords<BITS> LoadChunk(const uint8_t* p) {
  ChunkWords<BITS> c;
  if (BITS == 4) {
    QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "4-bit chunk not 16-byte aligned");
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    c.w[0] = v.x, c.w[1] = v.y, c.w[BITS > 2 ? 2 : 0] = v.z, c.w[BITS > 3 ? 3 : 0] = v.w;
  } else if (BITS == 2) {
    QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % 8 == 0, "2-bit chunk not 8-byte aligned");
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    c.w[0] = v.x, c.w[1] = v.y;
  } else {
    QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % 4 == 0, "3-bit chunk not 4-byte aligned");
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
    for (int i = 0; i < BITS; ++i) c.w[i] = w[i];
  }
  return c;
}

// Codes 4j .. 4j+3 of a chunk (j = 0..7, a compile-time constant once unrolled), one per byte.
template <int BITS>
__device__ __forceinline__ uint32_t CodeBytes(const ChunkWords<BITS>& c, int j) {
  return QuadFromWords(c.w[QuadLowWord(BITS, j)], c.w[BITS == 3 ? 2 : 0], BITS, j);
}

enum GemvMode : int { kXResident = 0, kXSlabs = 1, kXSlabsRows = 2 };

// Floats of the X staging area for `chunks` chunks per row: xs [mt][chunks][kXsStride], then xsum [mt][chunks][2].
constexpr int64_t GemvXsFloats(int mt, int64_t chunks) { return mt * chunks * (kXsStride + 2); }

template <typename T, int BITS, int MT, int R>
__global__ void __launch_bounds__(kGemvWarps * 32, GemvMinBlocks(MT)) SpQRGemvKernel(const SpQRMatMulArgs a,
                                                                                      int mode) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * R;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, BITS);
  const int64_t n_groups = Div(a.K + a.group_size - 1, a.group_size);
  const bool halves = a.group_size == 16;
  const uint32_t stat_row_bytes = static_cast<uint32_t>(spqr::PackedRowBytes(a.N, a.stat_bits));
  const uint32_t n2 = a.stat_bits ? static_cast<uint32_t>(Div(a.N + a.stat_group_size - 1, a.stat_group_size)) : 0;
  // the rows' statistics positions, row indices clamped to N - 1 (GroupStatsRows decodes all R rows)
  StatRow stat_rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) stat_rows[r] = MakeStatRow(a, min(n0 + r, a.N - 1));
  const bool stats_shared = stat_rows[0].stat_group == stat_rows[R - 1].stat_group;

  // dynamic shared memory: xs, xsum (GemvXsFloats) for all of K's chunks (kXResident) or one slab's, then at
  // kXSlabsRows X's rows [MT][K] of T, unpermuted (read once with coalesced loads, so that the permuted gathers of
  // the slab staging hit shared memory)
  const bool resident = mode == kXResident;
  const int xs_chunks = resident ? static_cast<int>((a.K + spqr::kChunk - 1) / spqr::kChunk) : kSlabChunks;
  QC_DYNAMIC_SHARED(float, xs);
  float* xsum = xs + MT * xs_chunks * kXsStride;
  const T* __restrict__ xg = x;
  if (mode == kXSlabsRows) {
    T* xrows = reinterpret_cast<T*>(xsum + MT * xs_chunks * 2);
    for (int64_t e = threadIdx.x; e < MT * a.K; e += kGemvWarps * 32) {
      xrows[e] = e < a.M * a.K ? x[e] : T();  // rows past M: zero bits
    }
    xg = xrows;
  }
  // X's columns [k0, k0 + 32 * xs_chunks) into xs (columns past K and rows past M as 0), then the half-chunk sums;
  // ends with a barrier
  auto stage = [&](int64_t k0) {
    const int cols = xs_chunks * spqr::kChunk;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      for (int j = threadIdx.x; j < cols; j += kGemvWarps * 32) {
        const int64_t k = k0 + j;
        float v = 0.f;
        if (m < a.M && k < a.K) v = ToFloat(xg[m * a.K + (a.perm ? a.perm[k] : k)]);
        xs[(m * xs_chunks + j / spqr::kChunk) * kXsStride + j % spqr::kChunk] = v;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < MT * xs_chunks * 2; e += kGemvWarps * 32) {  // e = (m * xs_chunks + c) * 2 + h
      const float* p = xs + (e >> 1) * kXsStride + 16 * (e & 1);
      float t = 0.f;
#pragma unroll
      for (int i = 0; i < 16; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(p + i);
        t += v.x, t += v.y, t += v.z, t += v.w;
      }
      xsum[e] = t;
    }
    __syncthreads();
  };

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  const int rows = static_cast<int>(min(static_cast<int64_t>(R), a.N - n0));  // <= 0 past N: the warp idles
  // chunk `chunk` of the warp's rows, at p for the first row (left as is past K or N)
  const int K = static_cast<int>(a.K);  // 32-bit slab and chunk arithmetic (the launcher keeps K + kSlab < 2^31)
  auto load_words = [&](const uint8_t* p, int chunk, ChunkWords<BITS>(&w)[R]) {
    if (chunk * spqr::kChunk >= K) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) w[r] = LoadChunk<BITS>(p + r * row_bytes);
    }
  };
  constexpr int64_t kSlabBytes = kSlabChunks * 4 * BITS;  // one slab of a row
  // the lane's chunk of row n0 in the current slab (computed once: the loop only advances it)
  const uint8_t* wp = a.qweight + n0 * row_bytes + lane * 4 * BITS;
  // one slab ahead (the next slab's chunks in flight while this one is staged and computed), except at MT = 8
  // (where the 3 * R more registers would spill)
  constexpr bool kAhead = MT <= 4;
  ChunkWords<BITS> words[R] = {}, next[R] = {};  // (zeroed once: each slab overwrites what it uses)
  if (kAhead) load_words(wp, lane, words);
  if (resident) stage(0);

  for (int k0 = 0; k0 < K; k0 += kSlab, wp += kSlabBytes) {
    if (!kAhead) {
      load_words(wp, k0 / spqr::kChunk + lane, words);
    } else if (k0 + kSlab < K) {
      load_words(wp + kSlabBytes, (k0 + kSlab) / spqr::kChunk + lane, next);
    }
    if (!resident) {
      __syncthreads();  // the previous slab is consumed
      stage(k0);
    }

    const int chunk = k0 / spqr::kChunk + lane;
    if (chunk * spqr::kChunk < K) {
      const int c = resident ? static_cast<int>(chunk) : lane;  // the lane's chunk in xs
      // code sums per (row, X row, half): four codes at a time, X's four values loaded once for all rows
      float d[R][MT][2];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) d[r][m][0] = d[r][m][1] = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float w[R][4];  // the rows' codes 4j .. 4j+3 as 1/2 + q/256
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t q = CodeBytes<BITS>(words[r], j);
#pragma unroll
          for (int b = 0; b < 4; ++b) w[r][b] = CodeAsFloat(q, b);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {  // one X row at a time: 4 values live, not 4 * MT
          const float* px = xs + (m * xs_chunks + c) * kXsStride + 4 * j;
          QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(px) % 16 == 0, "X in shared memory not 16-byte aligned");
          const float4 v = *reinterpret_cast<const float4*>(px);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float& t = d[r][m][j >> 2];
            t += w[r][0] * v.x, t += w[r][1] * v.y, t += w[r][2] * v.z, t += w[r][3] * v.w;
          }
        }
      }
      // then the statistics (after the sums: fewer values live through them), per group segment of the chunk: one
      // segment (group_size >= 32), or codes 0..15 and 16..31 (group_size 16)
      const uint32_t g_lo = static_cast<uint32_t>(Div(chunk * spqr::kChunk, a.group_size));
      float s[R], z[R];  // z: the zero + 128 (the codes' offset: they are 1/2 + q/256)
      GroupStatsRows<R>(a, n2, stat_row_bytes, g_lo, stat_rows, stats_shared, s, z);
      if (!halves) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float* ps = xsum + (m * xs_chunks + c) * 2;
            const float dx = d[r][m][0] + d[r][m][1], sx = ps[0] + ps[1];
            acc[r][m] += s[r] * (256.f * dx - z[r] * sx);
          }
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float sx = xsum[(m * xs_chunks + c) * 2];
            acc[r][m] += s[r] * (256.f * d[r][m][0] - z[r] * sx);
          }
        if (g_lo + 1 < n_groups) {  // (past K X is zero: nothing to add)
          GroupStatsRows<R>(a, n2, stat_row_bytes, g_lo + 1, stat_rows, stats_shared, s, z);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const float sx = xsum[(m * xs_chunks + c) * 2 + 1];
              acc[r][m] += s[r] * (256.f * d[r][m][1] - z[r] * sx);
            }
        }
      }
    }
    if (kAhead) {
#pragma unroll
      for (int r = 0; r < R; ++r) words[r] = next[r];
    }
  }

  T* __restrict__ y = static_cast<T*>(a.y);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    if (n >= a.N) break;  // the same for every lane of the warp
    if (a.row_ptr != nullptr) {
      for (int32_t p = a.row_ptr[n] + lane; p < a.row_ptr[n + 1]; p += 32) {
        const int64_t j = a.col_idx[p];  // a stored column: resident X is in stored order already
        const int64_t col = a.perm ? a.perm[j] : j;
        const float v = Half(a.values[p]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= a.M) continue;
          const float xv = resident ? xs[(m * xs_chunks + j / spqr::kChunk) * kXsStride + j % spqr::kChunk]
                                    : ToFloat(xg[m * a.K + col]);
          acc[r][m] += v * xv;
        }
      }
    }
    const float bias = BiasOf(a, n);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
      if (lane == 0 && m < a.M) Store(y + m * a.N + n, acc[r][m] + bias);
    }
  }
}

// Shared memory for one of `blocks` blocks per SM on the current device: min(opt-in per block, per SM / blocks - the
// 1 KB the runtime reserves per block). Cached per device.
int SharedBudgetPerBlock(int blocks) {
  static int optin[64] = {}, per_sm[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    (void)cudaGetLastError();
    return 48 * 1024;
  }
  if (optin[device] == 0) {
    int o = 0, p = 0;
    if (cudaDeviceGetAttribute(&o, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&p, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 48 * 1024;
    }
    per_sm[device] = p;
    optin[device] = o;
  }
  return max(48 * 1024, min(optin[device], per_sm[device] / blocks - 1024));
}

template <typename T, int BITS, int MT, int R>
void LaunchGemvTile(const SpQRMatMulArgs& a, int forced, cudaStream_t s) {
  constexpr int rows_per_block = kGemvWarps * R;
  const dim3 grid(static_cast<unsigned>((a.N + rows_per_block - 1) / rows_per_block));
  auto kernel = SpQRGemvKernel<T, BITS, MT, R>;
  const int budget = SharedBudgetPerBlock(GemvMinBlocks(MT));
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  const int64_t resident = GemvXsFloats(MT, chunks) * 4, slab = GemvXsFloats(MT, kSlabChunks) * 4;
  const int64_t with_rows = slab + MT * a.K * static_cast<int64_t>(sizeof(T));  // kXSlabsRows: a slab + X's rows
  int mode = kXSlabs;
  if (resident <= budget && (forced < 0 || forced == kXResident)) {
    mode = kXResident;
  } else if (a.perm != nullptr && with_rows <= budget && (forced < 0 || forced == kXSlabsRows)) {
    mode = kXSlabsRows;
  }
  int64_t bytes = mode == kXResident ? resident : mode == kXSlabsRows ? with_rows : slab;  // slab: <= 38 KB
  if (bytes > 48 * 1024) {
    // raise the kernel's limit to the budget once per device (not per call: a CUDA graph capture, which ORT starts
    // after its first runs, then finds nothing to do here)
    static std::atomic<int> raised[64];
    int device = 0;
    bool ok = cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < 64;
    if (ok && raised[device].load(std::memory_order_relaxed) < budget) {
      ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, budget) == cudaSuccess;
      if (ok) raised[device].store(budget, std::memory_order_relaxed);
    }
    if (!ok) {  // not raised on this device: one slab at a time from global memory
      (void)cudaGetLastError();
      mode = kXSlabs;
      bytes = slab;
    }
  }
  QC_LAUNCH(kernel, grid, dim3(kGemvWarps * 32), static_cast<size_t>(bytes), s, a, mode);
}

template <typename T, int BITS, int MT>
void LaunchGemvRows(const SpQRMatMulArgs& a, int r, int forced, cudaStream_t s) {
  if constexpr (GemvOffers(MT, 1)) {
    if (r == 1) return LaunchGemvTile<T, BITS, MT, 1>(a, forced, s);
  }
  if constexpr (GemvOffers(MT, 4)) {
    if (r == 4) return LaunchGemvTile<T, BITS, MT, 4>(a, forced, s);
  }
  LaunchGemvTile<T, BITS, MT, 2>(a, forced, s);  // offered by every tile
}

template <typename T, int BITS>
void LaunchGemvBits(const SpQRMatMulArgs& a, int r, int forced, cudaStream_t s) {
  if (a.M <= 1) {
    LaunchGemvRows<T, BITS, 1>(a, r, forced, s);
  } else if (a.M <= 2) {
    LaunchGemvRows<T, BITS, 2>(a, r, forced, s);
  } else if (a.M <= 4) {
    LaunchGemvRows<T, BITS, 4>(a, r, forced, s);
  } else {
    LaunchGemvRows<T, BITS, 8>(a, r, forced, s);
  }
}

template <typename T>
void LaunchGemvType(const SpQRMatMulArgs& a, int r, int forced, cudaStream_t s) {
  if (a.bits == 2) {
    LaunchGemvBits<T, 2>(a, r, forced, s);
  } else if (a.bits == 3) {
    LaunchGemvBits<T, 3>(a, r, forced, s);
  } else {
    LaunchGemvBits<T, 4>(a, r, forced, s);
  }
}

}  // namespace

void LaunchGemv(const SpQRMatMulArgs& a, int rows_per_warp, env::GemvX gemv_x, cudaStream_t s) {
  const int forced = gemv_x == env::GemvX::kResident ? kXResident
                     : gemv_x == env::GemvX::kSlabs  ? kXSlabs
                     : gemv_x == env::GemvX::kRows   ? kXSlabsRows
                                                     : -1;
  if (a.x_is_half) {
    LaunchGemvType<__half>(a, rows_per_warp, forced, s);
  } else {
    LaunchGemvType<float>(a, rows_per_warp, forced, s);
  }
}

}  // namespace Cuda
}  // namespace qcompiler
