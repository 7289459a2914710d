// SpQRMatMul CUDA device code, three kernels (docs/kernels.md):
// - decode, M <= 8 (group_size 16 or a multiple of 32): SpQRGemvKernel, a lane per 32-code chunk, X staged in
//   shared memory;
// - prefill with fp16 X (M >= kPrefillMinRows): SpQRMatMulPrefillKernel, tensor cores, X permuted once into scratch;
// - everything else (fp32 X with M > 8, other group sizes): SpQRMatMulKernel, one warp per output row n, decoding W
//   on the fly, described here.
//
// SpQRMatMulKernel: lane l of the warp owns column 32c + l of every 32-code chunk c: it extracts its code from the
// chunk (all lanes read the same 4*bits bytes), applies its group's (scale, zero) (bilevel statistics decoded in
// place), gathers X[m, perm[k]] directly (no permuted copy of X) and accumulates up to kMTile rows of X at once in
// fp32. Outliers are added by striding the row's CSR entries over the lanes; a warp shuffle reduction finishes the
// dot products.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/spqr_format.h"
#include "cuda/launch.cuh"
#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMTile = 8;  // rows of X accumulated per pass over W's row
// fp16 X with at least this many rows: the tensor-core prefill kernel. From 9 rows (past the decode GEMV's 8): it
// decodes each weight once per 64 rows of X, where the row kernel spends ~3x its instructions at 16 rows (an
// estimate from instruction counts, not a timing).
constexpr int64_t kPrefillMinRows = 9;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ float Half(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// a / b for 0 <= a, 0 < b < 2^31 (K, N, group sizes and indices into them; the launcher refuses larger): the GPU has
// no 64-bit divide instruction, and its division routine is a call of ~100 instructions.
__device__ __forceinline__ int64_t Div(int64_t a, int64_t b) {
  return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
}

// Where row n's first-level statistics live, computed once per row (not per chunk and group).
struct StatRow {
  int64_t n;
  int64_t stat_group;  // n / stat_group_size (coded statistics)
  int32_t chunk_byte;  // (n / 32) * 4 * stat_bits: n's chunk in a packed statistics row
  int32_t i;           // n % 32
};

__device__ __forceinline__ StatRow MakeStatRow(const SpQRMatMulArgs& a, int64_t n) {
  StatRow r;
  r.n = n;
  r.stat_group = a.stat_bits ? Div(n, a.stat_group_size) : 0;
  r.chunk_byte = static_cast<int32_t>(n / spqr::kChunk) * 4 * a.stat_bits;
  r.i = static_cast<int32_t>(n % spqr::kChunk);
  return r;
}

// GroupStats for (group g, row r.n); n2 = number of second-level groups per statistics row.
__device__ __forceinline__ void GroupStatsAt(const SpQRMatMulArgs& a, int64_t n2, int64_t row_bytes, int64_t g,
                                             const StatRow& r, float& s, float& z) {
  if (a.stat_bits == 0) {
    s = Half(static_cast<const uint16_t*>(a.scales)[g * a.N + r.n]);
    z = Half(static_cast<const uint16_t*>(a.zeros)[g * a.N + r.n]);
    return;
  }
  const int64_t off = g * row_bytes + r.chunk_byte;
  const uint16_t* st = a.stats2 + (g * n2 + r.stat_group) * 4;
  QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(st) % 8 == 0, "second-level statistics not 8-byte aligned");
  const uint2 v = *reinterpret_cast<const uint2*>(st);  // the group's four fp16 values in one load
  const float sc = static_cast<float>(spqr::ExtractCode(static_cast<const uint8_t*>(a.scales) + off, a.stat_bits, r.i));
  const float zc = static_cast<float>(spqr::ExtractCode(static_cast<const uint8_t*>(a.zeros) + off, a.stat_bits, r.i));
  s = Half(v.x & 0xffffu) * (sc - Half(v.x >> 16));
  z = Half(v.y & 0xffffu) * (zc - Half(v.y >> 16));
}

// First-level (scale, zero) of (group g, row n), locating the row on the spot.
__device__ __forceinline__ void GroupStats(const SpQRMatMulArgs& a, int64_t g, int64_t n, float& s, float& z) {
  const int64_t n2 = a.stat_bits ? Div(a.N + a.stat_group_size - 1, a.stat_group_size) : 0;
  GroupStatsAt(a, n2, spqr::PackedRowBytes(a.N, a.stat_bits), g, MakeStatRow(a, n), s, z);
}

// Codes 4j .. 4j+3 of a packed chunk, one per byte (the layout of spqr::ExtractCode), from two of its 32-bit words:
// `low`, word QuadLowWord(bits, j), which holds their 2-bit parts (their 4-bit codes at 4 bits), and `high`, word 2
// (bit i is bit 2 of code i; used at 3 bits only). With j known at compile time this is 2 (2, 4 bits) or 6 (3 bits)
// instructions.
__device__ __forceinline__ int QuadLowWord(int bits, int j) { return bits == 4 ? j & 3 : j & 1; }

__device__ __forceinline__ uint32_t QuadFromWords(uint32_t low, uint32_t high, int bits, int j) {
  if (bits == 4) return (low >> (4 * (j >> 2))) & 0x0f0f0f0fu;
  const uint32_t v = (low >> (2 * (j >> 1))) & 0x03030303u;  // byte b of the chunk: codes b, b+8, b+16, b+24
  if (bits != 3) return v;
  // bits 4j .. 4j+3 of word 2 to bit 2 of bytes 0..3: h * 0x00810204 is four copies of h shifted by 2, 9, 16 and 23
  // (no overlap, so no carries); bit b of the copy shifted by 2 + 7b lands on bit 8b + 2
  const uint32_t h = (high >> (4 * j)) & 0xfu;
  return ((h * 0x00810204u) & 0x04040404u) | v;
}

// Code byte `byte` of v (a code < 16) as the float 1/2 + q/256, exactly, in one byte permute: the code becomes bits
// 16..23 of the float, 0x3f its top byte (exponent 2^-1). Sums against x then give
//   sum_i q_i x_i = 256 * sum_i v_i x_i - 128 * sum_i x_i,
// folded into the group correction (a subtraction of 2^23 per code, the usual magic-number decode, costs an FADD).
// Precision: the 128 * sum x cancelled is at most ~20x the wanted sum, about 4 of fp32's 24 bits.
__device__ __forceinline__ float CodeAsFloat(uint32_t v, int byte) {
  return __uint_as_float(__byte_perm(v, 0x3f000000u, 0x7054u | (static_cast<uint32_t>(byte) << 8)));
}

// First-level (scale, zero) of group g for R consecutive rows starting at a multiple of R <= 4: in one 32-row chunk
// of the packed statistics, codes 4j + b0 + r of it (j = i0 / 4, b0 = i0 % 4 for the first row's i0). With coded
// statistics each array costs one or two 4-byte loads (the quad's low word, and word 2 at 3 bits) and the rows' codes
// are bytes of one QuadFromWords, turned into v0 * (code - v1) by one FFMA each from c = CodeAsFloat = 1/2 + code/256:
// (256 v0) c - v0 (128 + v1), constants per second-level group (the reference rounds the product once; this also
// rounds v0 (128 + v1), an absolute error ~1e-5 v0). The zeros come back as z + 128, what the GEMV subtracts (its
// codes are 1/2 + q/256 too). All R rows are decoded without a branch: rows past N (the last warp's) hold their row
// index clamped to N - 1 (the GEMV's stat_rows), so every load stays in bounds and their values go unused. Offsets
// are 32-bit (the launcher keeps the statistics arrays under 2^31 bytes): no 64-bit multiply per group.
template <int R>
__device__ __forceinline__ void GroupStatsRows(const SpQRMatMulArgs& a, uint32_t n2, uint32_t row_bytes, uint32_t g,
                                               const StatRow (&rs)[R], bool shared, float (&s)[R],
                                               float (&z128)[R]) {
  static_assert(R <= 4 && 4 % R == 0, "a warp's rows must lie in one quad of a statistics chunk");
  if (a.stat_bits == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t e = g * static_cast<uint32_t>(a.N) + static_cast<uint32_t>(rs[r].n);
      s[r] = Half(static_cast<const uint16_t*>(a.scales)[e]);
      z128[r] = Half(static_cast<const uint16_t*>(a.zeros)[e]) + 128.f;
    }
    return;
  }
  const uint32_t off = g * row_bytes + static_cast<uint32_t>(rs[0].chunk_byte);
  const uint32_t* ps = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(a.scales) + off);
  const uint32_t* pz = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(a.zeros) + off);
  QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(ps) % 4 == 0 && reinterpret_cast<uintptr_t>(pz) % 4 == 0,
                  "packed statistics not 4-byte aligned");
  const int j = rs[0].i >> 2, b0 = rs[0].i & 3, low = QuadLowWord(a.stat_bits, j);
  const bool three = a.stat_bits == 3;
  const uint32_t qs = QuadFromWords(ps[low], three ? ps[2] : 0u, a.stat_bits, j);
  const uint32_t qz = QuadFromWords(pz[low], three ? pz[2] : 0u, a.stat_bits, j);
  // second-level values: one load when the rows share their second-level group (stat_group_size a multiple of R)
  const uint16_t* st2 = a.stats2 + g * n2 * 4;
  float sa = 0.f, sb = 0.f, za = 0.f, zb = 0.f;  // s = sa c + sb, z + 128 = za c + zb
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r == 0 || !shared) {
      const uint2 v = *reinterpret_cast<const uint2*>(st2 + static_cast<uint32_t>(rs[r].stat_group) * 4);
      const float v0 = Half(v.x & 0xffffu), v1 = Half(v.x >> 16), v2 = Half(v.y & 0xffffu), v3 = Half(v.y >> 16);
      sa = 256.f * v0, sb = -v0 * (128.f + v1);  // 128 + v1: exact (v1 is an fp16 value)
      za = 256.f * v2, zb = fmaf(-v2, 128.f + v3, 128.f);
    }
    s[r] = fmaf(sa, CodeAsFloat(qs, b0 + r), sb);
    z128[r] = fmaf(za, CodeAsFloat(qz, b0 + r), zb);
  }
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
      const int64_t g = Div(k, a.group_size);
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
constexpr int kGemvWarps = 8;
constexpr int kSlabChunks = 32;  // one chunk per lane
constexpr int kSlab = kSlabChunks * spqr::kChunk;
constexpr int64_t kGemvMaxRows = 8;
// xs row stride in floats: 36 = 9 x 16 bytes, odd, so that a quarter warp's 16-byte loads of 8 chunks hit 8
// different bank groups
constexpr int kXsStride = spqr::kChunk + 4;

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

namespace {

// QCOMPILER_CUDA_GEMV_X = resident | slabs | rows: the decode GEMV's X staging forced where it fits (tests, A/B
// timing); unset: resident when it fits, else rows when perm is present and X's rows fit, else slabs.
int ForcedGemvMode() {
  const char* v = std::getenv("QCOMPILER_CUDA_GEMV_X");
  if (v == nullptr || *v == '\0') return -1;
  if (std::strcmp(v, "resident") == 0) return kXResident;
  if (std::strcmp(v, "slabs") == 0) return kXSlabs;
  if (std::strcmp(v, "rows") == 0) return kXSlabsRows;
  return -1;
}

template <typename T, int BITS, int MT, int R>
void LaunchGemvTile(const SpQRMatMulArgs& a, cudaStream_t s) {
  constexpr int rows_per_block = kGemvWarps * R;
  const dim3 grid(static_cast<unsigned>((a.N + rows_per_block - 1) / rows_per_block));
  auto kernel = SpQRGemvKernel<T, BITS, MT, R>;
  const int budget = SharedBudgetPerBlock(GemvMinBlocks(MT));
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  const int64_t resident = GemvXsFloats(MT, chunks) * 4, slab = GemvXsFloats(MT, kSlabChunks) * 4;
  const int64_t with_rows = slab + MT * a.K * static_cast<int64_t>(sizeof(T));  // kXSlabsRows: a slab + X's rows
  const int forced = ForcedGemvMode();
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

// QCOMPILER_CUDA_GEMV_ROWS = 1 | 2 | 4: the decode GEMV's rows per warp forced where its tile offers it (tests, A/B
// timing); unset, or not offered: GemvRowsPerWarp's choice.
int ForcedGemvRows() {
  const char* v = std::getenv("QCOMPILER_CUDA_GEMV_ROWS");
  if (v == nullptr || *v == '\0') return 0;
  const int r = std::atoi(v);
  return r == 1 || r == 2 || r == 4 ? r : 0;
}

template <typename T, int BITS, int MT>
void LaunchGemvRows(const SpQRMatMulArgs& a, cudaStream_t s) {
  int r = ForcedGemvRows();
  if (r == 0 || !GemvOffers(MT, r)) r = GemvRowsPerWarp(a.M, a.N, MultiprocessorCount());
  if constexpr (GemvOffers(MT, 1)) {
    if (r == 1) return LaunchGemvTile<T, BITS, MT, 1>(a, s);
  }
  if constexpr (GemvOffers(MT, 4)) {
    if (r == 4) return LaunchGemvTile<T, BITS, MT, 4>(a, s);
  }
  LaunchGemvTile<T, BITS, MT, 2>(a, s);  // offered by every tile
}

template <typename T, int BITS>
void LaunchGemv(const SpQRMatMulArgs& a, cudaStream_t s) {
  if (a.M <= 1) {
    LaunchGemvRows<T, BITS, 1>(a, s);
  } else if (a.M <= 2) {
    LaunchGemvRows<T, BITS, 2>(a, s);
  } else if (a.M <= 4) {
    LaunchGemvRows<T, BITS, 4>(a, s);
  } else {
    LaunchGemvRows<T, BITS, 8>(a, s);
  }
}

template <typename T>
void LaunchGemv(const SpQRMatMulArgs& a, cudaStream_t s) {
  if (a.bits == 2) {
    LaunchGemv<T, 2>(a, s);
  } else if (a.bits == 3) {
    LaunchGemv<T, 3>(a, s);
  } else {
    LaunchGemv<T, 4>(a, s);
  }
}

// ---- prefill (fp16 X, M >= kPrefillMinRows): TM x TN output tiles on tensor cores ----
//
// Per 32-column chunk a block stages X's TM rows (in stored column order: the launcher permuted X's columns first)
// and W's TN rows decoded to fp16 in shared memory, then its WM x WN warps each accumulate a (TM / WM) x (TN / WN)
// part in fp32 (WMMA 16x16x16 fragments); the epilogue adds the bias and rounds to fp16 once, a fragment at a time
// through a small per-warp buffer. W is decoded once per TM rows of X: the first-level statistics of the chunk's (at
// most two) groups once per row, the codes four at a time (a thread per (row, quad): QuadFromWords on the two words
// that hold them, each code to fp32 by a byte permute and one FFMA), then the rows' outliers in the chunk added into
// the tile. X's rows load 16 bytes at a time where K allows (K % 8 == 0); its rows past M are never read into the
// stored outputs, so not staged. Two tiles (PrefillSmall, PrefillLarge; PrefillUsesLargeTile chooses): 64 x 64
// (4 warps) up to 64 rows of X, 128 x 128 (8 warps: W decoded once per 128 rows, 4x the multiply-adds per chunk for 2x
// the decode work) beyond, where its grid gives every SM a block.
constexpr int kTileK = spqr::kChunk, kTilePad = 8;

template <int TM, int TN, int WM, int WN>
struct PrefillTile {
  static constexpr int M = TM, N = TN, kWarpsM = WM, kWarpsN = WN, kThreads = 32 * WM * WN;
  static constexpr int kFragsM = TM / WM / 16, kFragsN = TN / WN / 16;  // per warp
  static_assert(kThreads == 2 * TN, "two threads per tile row load its statistics (one per group)");
  static_assert(TN * 8 % kThreads == 0 && kFragsM * WM * 16 == TM && kFragsN * WN * 16 == TN, "tile shape");
};
using PrefillSmall = PrefillTile<64, 64, 2, 2>;
using PrefillLarge = PrefillTile<128, 128, 2, 4>;

template <int BITS, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 512 / Tile::kThreads) SpQRMatMulPrefillKernel(
    const SpQRMatMulArgs a) {
  using namespace nvcuda;
  constexpr int kTileM = Tile::M, kTileN = Tile::N, kPrefillThreads = Tile::kThreads;
  constexpr int FM = Tile::kFragsM, FN = Tile::kFragsN, kWarps = Tile::kWarpsM * Tile::kWarpsN;
  __shared__ __align__(32) __half xs[kTileM][kTileK + kTilePad];
  __shared__ __align__(32) __half ws[kTileN][kTileK + kTilePad];
  __shared__ __align__(32) float out[kWarps][16][16 + 4];  // the epilogue's per-warp fragment buffer
  // per (row, group i of the chunk): w = s (q - z) as fmaf(256 s, c, -s (128 + z)) with c = CodeAsFloat = 1/2 + q/256
  // (the format allows fma(q, s, -s z); the rounding of -s (128 + z), ~1e-5 s, is far below fp16's)
  __shared__ float st_a[kTileN][2], st_b[kTileN][2];

  const __half* __restrict__ x = static_cast<const __half*>(a.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x >> 5, wm = warp / Tile::kWarpsN, wn = warp % Tile::kWarpsN;
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, BITS);
  const int64_t chunks = (a.K + kTileK - 1) / kTileK;
  const int rows_m = static_cast<int>(min(static_cast<int64_t>(kTileM), a.M - m0));  // X's rows in the tile
  const bool x_vec = a.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.f);
  // thread t: the statistics of row st_r = t / 2 of the tile, group st_i = t % 2 of each chunk (rows past N: 0);
  // where that row's statistics live, computed once
  const int st_r = threadIdx.x >> 1, st_i = threadIdx.x & 1;
  const bool st_valid = n0 + st_r < a.N;
  const StatRow st_row = MakeStatRow(a, st_valid ? n0 + st_r : 0);
  const int64_t st_n2 = a.stat_bits ? Div(a.N + a.stat_group_size - 1, a.stat_group_size) : 0;
  const int64_t st_row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
  // the thread's code quads: quad j = t % 8 of rows t / 8 + i * (threads / 8), i < kQuads, of each chunk; their rows'
  // packed codes (nullptr past N: weights 0)
  constexpr int kQuads = kTileN * 8 / kPrefillThreads;
  const uint8_t* wq[kQuads];
#pragma unroll
  for (int it = 0; it < kQuads; ++it) {
    const int64_t n = n0 + (threadIdx.x >> 3) + it * (kPrefillThreads / 8);
    wq[it] = n < a.N ? a.qweight + n * row_bytes : nullptr;
  }
  // thread t < kTileN: the CSR entries of row n0 + t not yet added, [op, op_end)
  int32_t op = 0, op_end = 0;
  if (a.row_ptr != nullptr && threadIdx.x < kTileN && n0 + threadIdx.x < a.N) {
    op = a.row_ptr[n0 + threadIdx.x];
    op_end = a.row_ptr[n0 + threadIdx.x + 1];
  }

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kTileK;
    // statistics of the chunk's groups: (row st_r, group k0 / gs + st_i)
    {
      const int64_t g = Div(k0, a.group_size) + st_i;
      float sv = 0.f, zv = 0.f;
      if (st_valid && g * a.group_size < a.K) GroupStatsAt(a, st_n2, st_row_bytes, g, st_row, sv, zv);
      st_a[st_r][st_i] = 256.f * sv;
      st_b[st_r][st_i] = -sv * (128.f + zv);
    }
    // X: 8 columns per step, (row r, columns 8v .. 8v+7) for e = 4r + v; rows past M are left as they are (they only
    // reach output rows past M, which are not stored)
    for (int e = threadIdx.x; e < rows_m * (kTileK / 8); e += kPrefillThreads) {
      const int r = e >> 2, v = e & 3;
      const int64_t k = k0 + 8 * v;
      __half* dst = &xs[r][8 * v];
      if (x_vec && k + 8 <= a.K) {
        const __half* src = x + (m0 + r) * a.K + k;
        QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0,
                        "X tile row not 16-byte aligned");
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int t = 0; t < 8; ++t) {  // (the ragged case: K % 8 != 0, or the last chunk)
          dst[t] = k + t < a.K ? x[(m0 + r) * a.K + k + t] : __float2half(0.f);
        }
      }
    }
    __syncthreads();
    // W: codes 4j .. 4j+3 of the thread's rows r; the chunk's second group (if any) starts at column `next`
    const bool tail = k0 + kTileK > a.K;
    const int tail_cols = static_cast<int>(a.K - k0);
    const int next = static_cast<int>(min(static_cast<int64_t>(kTileK),
                                          (Div(k0, a.group_size) + 1) * a.group_size - k0));
    const bool quad_groups = next % 4 == 0 && !tail;  // the common case: no quad straddles a group or K's end
#pragma unroll
    for (int it = 0; it < kQuads; ++it) {
      const int r = (threadIdx.x >> 3) + it * (kPrefillThreads / 8), j = threadIdx.x & 7;
      uint32_t lo = 0u, hi = 0u;
      if (wq[it] != nullptr) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(wq[it] + c * 4 * BITS);
        QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(w) % 4 == 0, "packed chunk not 4-byte aligned");
        lo = w[QuadLowWord(BITS, j)];
        if (BITS == 3) hi = w[2];
      }
      const uint32_t q = QuadFromWords(lo, hi, BITS, j);
      // (rows past N: statistics 0, so weights 0)
      uint32_t h[4];
      if (quad_groups) {  // the quad in one group and inside K: its (a, b) once
        const int i = 4 * j >= next;
        const float sa = st_a[r][i], sb = st_b[r][i];
#pragma unroll
        for (int b = 0; b < 4; ++b) h[b] = __half_as_ushort(__float2half(fmaf(sa, CodeAsFloat(q, b), sb)));
      } else {  // a group boundary inside the quad (β1 not a multiple of 4), or the last chunk
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int i = 4 * j + b >= next;
          float wv = fmaf(st_a[r][i], CodeAsFloat(q, b), st_b[r][i]);
          if (tail && 4 * j + b >= tail_cols) wv = 0.f;  // past K (the last chunk only)
          h[b] = __half_as_ushort(__float2half(wv));
        }
      }
      QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(&ws[r][4 * j]) % 8 == 0, "W tile not 8-byte aligned");
      *reinterpret_cast<uint2*>(&ws[r][4 * j]) = make_uint2(h[0] | h[1] << 16, h[2] | h[3] << 16);
    }
    __syncthreads();
    // the tile rows' outliers in this chunk, a thread per row, each walking its row's entries once over all chunks
    // (columns strictly increase within a row: docs/spqr-format.md)
    for (; op < op_end; ++op) {
      const int j = a.col_idx[op] - static_cast<int>(k0);
      if (j >= kTileK) break;
      __half& t = ws[threadIdx.x][j];
      t = __float2half(__half2float(t) + Half(a.values[op]));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[FN];  // B[k][n] = ws[n][k]
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], &xs[(wm * FM + i) * 16][kk], kTileK + kTilePad);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], &ws[(wn * FN + j) * 16][kk], kTileK + kTilePad);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  // epilogue: each fragment through the warp's buffer, a lane per 8 of its 256 values (a lane's column is fixed)
  __half* __restrict__ y = static_cast<__half*>(a.y);
  const int lane = threadIdx.x & 31, ecol = lane & 15;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(&out[warp][0][0], acc[i][j], 16 + 4, wmma::mem_row_major);
      __syncwarp();
      const int64_t n = n0 + (wn * FN + j) * 16 + ecol;
      const float bias = n < a.N ? BiasOf(a, n) : 0.f;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int erow = (lane >> 4) + 2 * t;
        const int64_t m = m0 + (wm * FM + i) * 16 + erow;
        if (m < a.M && n < a.N) y[m * a.N + n] = __float2half_rn(out[warp][erow][ecol] + bias);
      }
      __syncwarp();  // the buffer is read before the next fragment overwrites it
    }
}

}  // namespace

bool PrefillUsesLargeTile(int64_t M, int64_t N, int sms) {
  const char* v = std::getenv("QCOMPILER_CUDA_PREFILL_TILE");
  if (v != nullptr && std::strcmp(v, "64") == 0) return false;
  if (v != nullptr && std::strcmp(v, "128") == 0) return true;
  if (M <= PrefillSmall::M) return false;  // one row of small tiles: the large one would only add padding
  // the large tile where its grid still gives every SM a block (an estimate: W decoded half as often per row of X,
  // against fewer, bigger blocks)
  const int64_t blocks =
      ((M + PrefillLarge::M - 1) / PrefillLarge::M) * ((N + PrefillLarge::N - 1) / PrefillLarge::N);
  return sms <= 0 || blocks >= sms;
}

namespace {
template <typename Tile>
void LaunchPrefill(const SpQRMatMulArgs& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.N + Tile::N - 1) / Tile::N),
                  static_cast<unsigned>((p.M + Tile::M - 1) / Tile::M));
  if (p.bits == 2) {
    QC_LAUNCH((SpQRMatMulPrefillKernel<2, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  } else if (p.bits == 3) {
    QC_LAUNCH((SpQRMatMulPrefillKernel<3, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  } else {
    QC_LAUNCH((SpQRMatMulPrefillKernel<4, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  }
}

bool UsesPrefill(const SpQRMatMulArgs& a) {  // a 32-column chunk must meet at most two groups
  return a.x_is_half && a.M >= kPrefillMinRows && (a.group_size == 16 || a.group_size >= 32);
}

// out[m, j] = x[m, perm[j]]: X's columns in stored order, once per call, so that the prefill kernel's blocks read
// contiguous rows instead of gathering single halves from all of X (every block of a column of tiles would repeat it)
__global__ void PermuteColumnsKernel(const __half* __restrict__ x, const int32_t* __restrict__ perm,
                                     __half* __restrict__ out, int64_t M, int64_t K) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < K;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[m * K + j] = x[m * K + perm[j]];
    }
  }
}
}  // namespace

size_t ScratchBytes(const SpQRMatMulArgs& args) {
  return UsesPrefill(args) && args.perm != nullptr ? static_cast<size_t>(args.M * args.K) * sizeof(__half) : 0;
}

int LaunchSpQRMatMul(const SpQRMatMulArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return static_cast<int>(cudaSuccess);
  // the kernels divide in 32 bits (Div); the decode GEMV counts columns in int up to a slab past K
  constexpr int64_t kMax32 = (int64_t{1} << 31) - 1;
  if (args.K + kSlab > kMax32 || args.N + 32 > kMax32 || args.M * args.K > (int64_t{1} << 40)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((args.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // the decode GEMV: its group sizes, and statistics arrays it can index with 32-bit offsets (GroupStatsRows)
  const int64_t groups = (args.K + args.group_size - 1) / args.group_size;
  const int64_t stat_bytes = groups * (args.stat_bits ? spqr::PackedRowBytes(args.N, args.stat_bits) : args.N * 2);
  const int64_t stats2_bytes =
      args.stat_bits ? groups * ((args.N + args.stat_group_size - 1) / args.stat_group_size) * 8 : 0;
  const bool gemv_groups = (args.group_size == 16 || args.group_size % 32 == 0) && stat_bytes < (int64_t{1} << 31) &&
                           stats2_bytes < (int64_t{1} << 31);
  if (UsesPrefill(args)) {
    SpQRMatMulArgs p = args;
    if (args.perm != nullptr) {
      if (args.scratch == nullptr) return static_cast<int>(cudaErrorInvalidValue);  // ScratchBytes was not honoured
      const dim3 pgrid(static_cast<unsigned>((args.K + 255) / 256),
                       static_cast<unsigned>(std::min<int64_t>(args.M, 65535)));
      QC_LAUNCH(PermuteColumnsKernel, pgrid, dim3(256), 0, s, static_cast<const __half*>(args.x), args.perm,
                static_cast<__half*>(args.scratch), args.M, args.K);
      p.x = args.scratch;
      p.perm = nullptr;  // X is in stored order now; outliers index stored columns anyway
    }
    if (PrefillUsesLargeTile(args.M, args.N, MultiprocessorCount())) {
      LaunchPrefill<PrefillLarge>(p, s);
    } else {
      LaunchPrefill<PrefillSmall>(p, s);
    }
  } else if (args.M <= kGemvMaxRows && gemv_groups && args.x_is_half) {
    LaunchGemv<__half>(args, s);
  } else if (args.M <= kGemvMaxRows && gemv_groups) {
    LaunchGemv<float>(args, s);
  } else if (args.x_is_half) {
    QC_LAUNCH(SpQRMatMulKernel<__half>, grid, block, 0, s, args);
  } else {
    QC_LAUNCH(SpQRMatMulKernel<float>, grid, block, 0, s, args);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* CudaErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace Cuda
}  // namespace qcompiler
