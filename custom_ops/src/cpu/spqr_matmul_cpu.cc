// CPU kernel of qcompiler::SpQRMatMul: Y[m, n] = sum_k X[m, k] * W[n, k] + bias[n], W decoded on the fly.
//
// X is converted to fp32 and permuted once per call (Xp[m, j] = X[m, perm[j]]), so the permutation costs nothing
// inside the loops; W is decoded row by row (codes -> s*(q - z) with that row's group statistics, then the row's
// outliers added) in stored (permuted) column order. No dense copy of W is kept between calls. Two paths, both split
// over output rows n with ORT's intra-op thread pool:
// - GEMV (M < kGemmMinRows, decode; group_size a multiple of 8): each task takes kGemvRows rows of W (one packed
//   statistics chunk along N) and K in blocks of whole groups. It decodes the block's first-level statistics for its
//   rows once (vectorized over the 32 rows of a packed chunk), then streams each row's packed codes 8 at a time
//   (u8 -> fp32 lanes), computing sum_g s_g * sum_k (q_k - z_g) x_k with vector accumulators; outliers are added
//   from their CSR rows afterwards. Nothing of W is materialized;
// - rows (the fallback for other group sizes): each task decodes kRowBlock rows of W at a time and dots them with
//   each X row;
// - GEMM (prefill): each task decodes a tile of kNr rows of W once, transposed to [K, kNr], and multiplies it with
//   all of X by a kMr x kNr register-blocked micro-kernel (X values broadcast, W rows as vectors), K in blocks of
//   kKc so the tile block stays in L1; partial sums live in an [M, kNr] fp32 buffer of the task.
#include "cpu/spqr_matmul_cpu.h"

#include "cpu/gemv_avx512.h"
#include "cpu/packed.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace qcompiler {
namespace Cpu {
namespace {

using spqr::Attributes;
using spqr::BoundInputs;

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// A second copy compiled for AVX2 + FMA, picked at load time on CPUs that have them (GCC function multiversioning).
#define SPQR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPQR_CPU_CLONES
#endif

typedef float V8 __attribute__((vector_size(32)));  // 8 fp32 lanes: one AVX register, or two SSE/NEON ones

// GEMM path: X rows per micro-tile, W rows per tile (two V8 per X row: 12 accumulators fit AVX2's 16 registers),
// K per cache block, and the smallest M that takes it.
constexpr int kMr = 6;
constexpr int kNr = 16;
constexpr int64_t kKc = 256;
constexpr int64_t kGemmMinRows = 8;

// GEMV path: W rows per task (= spqr::kChunk, so a task's packed statistics are whole chunks), and about this many
// K columns per block (rounded to whole groups; the block's statistics, 2 x 32 floats per group, stay in L1).
constexpr int64_t kGemvRows = spqr::kChunk;
constexpr int64_t kGemvCols = 16384;

typedef int32_t I8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint64_t Q4 __attribute__((vector_size(32)));

// The codes of one packed chunk (docs/spqr-format.md) as fp32 lanes, 8 at a time. Load() broadcasts 8 packed bytes
// (one vpbroadcastq) to the lanes as 32-bit words {w0, w1, w0, w1, ...}; Lanes(s) shifts each lane by its own
// amount (vpsrlvd on AVX2) and masks. Lane i of lane group s therefore holds code 8*s + kLaneCode[i], not 8*s + i:
// the GEMV path stores X in the same lane order (LanePos), so the dot products need no shuffle.
constexpr int kLaneCode[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // lane i reads byte i/2 of word i%2
constexpr int kCodeLane[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // its inverse

// Position of stored column k in the GEMV path's lane-ordered X.
inline int64_t LanePos(int64_t k) { return (k & ~int64_t{7}) | kCodeLane[k & 7]; }

template <int BITS>
struct ChunkDecoder {
  U8 lo, hi;  // BITS=4: bytes 0..7 and 8..15; else lo = the 2-bit plane (bytes 0..7), hi = the high-bit word

  static U8 Words(const uint8_t* p) {
    uint64_t q;
    std::memcpy(&q, p, sizeof(q));
    const Q4 v = Q4{} + q;
    return (U8)v;  // same-size vector cast: a bit cast (GCC/Clang vector extensions), no aliasing through a reference
  }
  void Load(const uint8_t* chunk) {
    lo = Words(chunk);
    if (BITS == 4) {
      hi = Words(chunk + 8);
    } else if (BITS == 3) {
      const U8 word1 = {1, 1, 1, 1, 1, 1, 1, 1};  // bytes 4..11 = {w1, w2}: w2, the high bits, to every lane
      hi = __builtin_shuffle(Words(chunk + 4), word1);
    }
  }
  V8 Lanes(int s) const {
    const U8 byte_shift = {0, 0, 8, 8, 16, 16, 24, 24};
    U8 v;
    if (BITS == 4) {
      v = ((s & 1 ? hi : lo) >> (byte_shift + 4 * (s >> 1))) & 15u;
    } else {
      v = (lo >> (byte_shift + 2 * s)) & 3u;
      if (BITS == 3) {
        const U8 code = {0, 4, 1, 5, 2, 6, 3, 7};  // kLaneCode
        v |= ((hi >> (code + 8 * s)) << 2) & 4u;
      }
    }
    return __builtin_convertvector((I8)v, V8);
  }
};

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[r] = dot(w + r*K, x) for r < kRowBlock: 8 lanes per row, each x vector loaded once for all rows.
SPQR_CPU_CLONES
void DotRows(const float* __restrict w, const float* __restrict x, int64_t K, float* __restrict out) {
  V8 acc[kRowBlock] = {};
  int64_t i = 0;
  for (; i + 8 <= K; i += 8) {
    const V8 xv = Load8(x + i);
    for (int r = 0; r < kRowBlock; ++r) acc[r] += Load8(w + r * K + i) * xv;
  }
  for (int r = 0; r < kRowBlock; ++r) {
    float tail = 0.f;
    for (int64_t k = i; k < K; ++k) tail += w[r * K + k] * x[k];
    const V8& a = acc[r];
    out[r] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail;
  }
}

// c[i, 0:kNr] += sum_{k < kc} x[i][k] * wt[k, 0:kNr] for i < kMr (x[i] points at row i's first column of the block).
SPQR_CPU_CLONES
void MicroKernel(const float* const* __restrict x, const float* __restrict wt, int64_t kc, float* __restrict c) {
  V8 acc[kMr][2];
  for (int i = 0; i < kMr; ++i) {
    acc[i][0] = Load8(c + i * kNr);
    acc[i][1] = Load8(c + i * kNr + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const V8 w0 = Load8(wt + k * kNr), w1 = Load8(wt + k * kNr + 8);
    for (int i = 0; i < kMr; ++i) {
      const V8 xb = V8{} + x[i][k];
      acc[i][0] += xb * w0;
      acc[i][1] += xb * w1;
    }
  }
  for (int i = 0; i < kMr; ++i) {
    std::memcpy(c + i * kNr, &acc[i][0], sizeof(V8));
    std::memcpy(c + i * kNr + 8, &acc[i][1], sizeof(V8));
  }
}

// Everything one ParallelFor task needs (read-only, shared by all tasks).
struct Job {
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
  std::vector<int64_t> packed_rows;
  std::vector<PackedGemvFn> packed_fns;
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

// First-level (scale, zero) of row n for all G groups.
void RowStats(const Job& j, int64_t n, float* s, float* z) {
  const Attributes& a = j.a;
  const int64_t G = a.n_groups();
  if (a.stat_bits == 0) {
    const auto* sc = static_cast<const uint16_t*>(j.scales);
    const auto* zc = static_cast<const uint16_t*>(j.zeros);
    for (int64_t g = 0; g < G; ++g) {
      s[g] = HalfToFloat(sc[g * a.N + n]);
      z[g] = HalfToFloat(zc[g * a.N + n]);
    }
    return;
  }
  const int sb = static_cast<int>(a.stat_bits);
  const int64_t row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
  const int64_t N2 = a.n_stat_groups();
  const int64_t t = n / a.stat_group_size;
  const auto* sc = static_cast<const uint8_t*>(j.scales);
  const auto* zc = static_cast<const uint8_t*>(j.zeros);
  for (int64_t g = 0; g < G; ++g) {
    const uint16_t* st = j.stats2 + (g * N2 + t) * 4;
    const float ss = HalfToFloat(st[0]), sz = HalfToFloat(st[1]), zs = HalfToFloat(st[2]), zz = HalfToFloat(st[3]);
    s[g] = ss * (static_cast<float>(spqr::ExtractCode(sc + g * row_bytes, sb, n)) - sz);
    z[g] = zs * (static_cast<float>(spqr::ExtractCode(zc + g * row_bytes, sb, n)) - zz);
  }
}

// Decoded row n of W in stored column order from its first-level statistics s, z [G], outliers included:
// w[k] = s_g * (q_k - z_g) (+ delta).
SPQR_CPU_CLONES void DecodeRowWithStats(const Job& j, int64_t n, const float* s, const float* z, float* w,
                                        uint8_t* codes) {
  const Attributes& a = j.a;
  const int bits = static_cast<int>(a.bits);
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  const uint8_t* qrow = j.qweight + n * spqr::PackedRowBytes(a.K, a.bits);
  for (int64_t c = 0; c < chunks; ++c) spqr::DecodeChunk(qrow + c * 4 * bits, bits, codes + c * spqr::kChunk);
  const int64_t G = a.n_groups();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t begin = g * a.group_size, end = std::min(a.K, begin + a.group_size);
    const float sg = s[g], zg = z[g];
    for (int64_t k = begin; k < end; ++k) w[k] = sg * (static_cast<float>(codes[k]) - zg);
  }
  if (j.row_ptr != nullptr) {
    for (int32_t p = j.row_ptr[n]; p < j.row_ptr[n + 1]; ++p) w[j.col_idx[p]] += HalfToFloat(j.values[p]);
  }
}

// DecodeRowWithStats with the row's statistics decoded here (s, z: [G] scratch).
void DecodeRow(const Job& j, int64_t n, float* w, uint8_t* codes, float* s, float* z) {
  RowStats(j, n, s, z);
  DecodeRowWithStats(j, n, s, z, w, codes);
}

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

void RowBlockTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const Attributes& a = j.a;
  const int64_t n_begin = static_cast<int64_t>(task) * j.rows_per_task;
  const int64_t n_end = std::min(a.N, n_begin + j.rows_per_task);
  const int64_t G = a.n_groups();
  const int64_t K = a.K;
  const int64_t k_pad = (K + spqr::kChunk - 1) / spqr::kChunk * spqr::kChunk;
  // kRowBlock decoded rows (rows past n_end stay zero), then the first-level statistics of one row.
  std::unique_ptr<float[]> w(new float[kRowBlock * K + 2 * G]());
  std::unique_ptr<uint8_t[]> codes(new uint8_t[k_pad]);
  float* s = w.get() + kRowBlock * K;
  float* z = s + G;
  float dots[kRowBlock];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, n_end - n0));
    for (int r = 0; r < rows; ++r) DecodeRow(j, n0 + r, w.get() + r * K, codes.get(), s, z);
    if (rows < kRowBlock) std::fill(w.get() + rows * K, w.get() + kRowBlock * K, 0.f);
    float b[kRowBlock];
    for (int r = 0; r < rows; ++r) b[r] = BiasOf(j, n0 + r);
    for (int64_t m = 0; m < j.M; ++m) {
      DotRows(w.get(), j.xp + m * j.xstride, K, dots);
      for (int r = 0; r < rows; ++r) Store(j, m, n0 + r, dots[r] + b[r]);
    }
  }
}

// Whether BlockStats decodes quantized statistics 8 rows at a time (each 8 rows must share their second-level
// statistics).
inline bool StatsDecodedEightRowsAtOnce(const Attributes& a) {
  return a.stat_bits != 0 && a.stat_group_size % 8 == 0;
}

// BlockStats for quantized statistics with stat_group_size % 8 == 0: 8 rows per vector, in lane order.
template <int SB>
SPQR_CPU_CLONES void BlockStatsLanes(const Job& j, int64_t n0, int64_t g0, int64_t g1, float* s, float* z) {
  const int64_t bg = g1 - g0;
  const Attributes& a = j.a;
  const int64_t row_bytes = spqr::PackedRowBytes(a.N, SB);
  const int64_t N2 = a.n_stat_groups();
  const int64_t chunk = (n0 / spqr::kChunk) * 4 * SB;
  const int lane_groups = static_cast<int>((std::min(kGemvRows, a.N - n0) + 7) / 8);
  int64_t t[4];  // second-level group of each 8 rows (clamped: rows past N read a valid group, never stored)
  for (int lg = 0; lg < 4; ++lg) t[lg] = std::min(N2 - 1, (n0 + 8 * lg) / a.stat_group_size);
  const auto* sc = static_cast<const uint8_t*>(j.scales);
  const auto* zc = static_cast<const uint8_t*>(j.zeros);
  ChunkDecoder<SB> ds, dz;
  for (int64_t g = g0; g < g1; ++g) {
    ds.Load(sc + g * row_bytes + chunk);
    dz.Load(zc + g * row_bytes + chunk);
    for (int lg = 0; lg < lane_groups; ++lg) {
      const uint16_t* st = j.stats2 + (g * N2 + t[lg]) * 4;
      const V8 sv = HalfToFloat(st[0]) * (ds.Lanes(lg) - HalfToFloat(st[1]));
      const V8 zv = HalfToFloat(st[2]) * (dz.Lanes(lg) - HalfToFloat(st[3]));
      for (int i = 0; i < 8; ++i) {  // lane i holds row 8 * lg + kLaneCode[i]
        s[(8 * lg + kLaneCode[i]) * bg + (g - g0)] = sv[i];
        z[(8 * lg + kLaneCode[i]) * bg + (g - g0)] = zv[i];
      }
    }
  }
}

// First-level statistics of rows [n0, n0 + kGemvRows) for groups [g0, g1), row-major: s[r * (g1 - g0) + g - g0]
// (one row's statistics contiguous for the row kernels; rows past N get whatever the padded chunk holds, never
// stored).
void BlockStats(const Job& j, int64_t n0, int64_t g0, int64_t g1, float* s, float* z) {
  const Attributes& a = j.a;
  const int64_t rows = std::min(kGemvRows, a.N - n0);
  if (a.stat_bits == 0) {
    const auto* sc = static_cast<const uint16_t*>(j.scales);
    const auto* zc = static_cast<const uint16_t*>(j.zeros);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        s[r * (g1 - g0) + g - g0] = HalfToFloat(sc[g * a.N + n0 + r]);
        z[r * (g1 - g0) + g - g0] = HalfToFloat(zc[g * a.N + n0 + r]);
      }
    }
    return;
  }
  if (StatsDecodedEightRowsAtOnce(a)) {
    if (a.stat_bits == 2) return BlockStatsLanes<2>(j, n0, g0, g1, s, z);
    if (a.stat_bits == 3) return BlockStatsLanes<3>(j, n0, g0, g1, s, z);
    return BlockStatsLanes<4>(j, n0, g0, g1, s, z);
  }
  const int sb = static_cast<int>(a.stat_bits);
  const int64_t row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
  const int64_t N2 = a.n_stat_groups();
  const int64_t chunk = (n0 / spqr::kChunk) * 4 * sb;
  const auto* sc = static_cast<const uint8_t*>(j.scales);
  const auto* zc = static_cast<const uint8_t*>(j.zeros);
  uint8_t qs[spqr::kChunk], qz[spqr::kChunk];
  for (int64_t g = g0; g < g1; ++g) {
    spqr::DecodeChunk(sc + g * row_bytes + chunk, sb, qs);
    spqr::DecodeChunk(zc + g * row_bytes + chunk, sb, qz);
    for (int64_t r = 0; r < rows;) {  // runs of rows sharing one set of second-level statistics
      const int64_t t = (n0 + r) / a.stat_group_size;
      const int64_t end = std::min(rows, (t + 1) * a.stat_group_size - n0);
      const uint16_t* st = j.stats2 + (g * N2 + t) * 4;
      const float ss = HalfToFloat(st[0]), sz = HalfToFloat(st[1]), zs = HalfToFloat(st[2]), zz = HalfToFloat(st[3]);
      for (; r < end; ++r) {
        s[r * (g1 - g0) + g - g0] = ss * (static_cast<float>(qs[r]) - sz);
        z[r * (g1 - g0) + g - g0] = zs * (static_cast<float>(qz[r]) - zz);
      }
    }
  }
}

// y[m] += sum over groups [g0, g1) of s_g * sum_k (q_k - z_g) * x[m, k] for one packed row, MM rows of X.
template <int BITS, int MM>
SPQR_CPU_CLONES void GemvRow(const Job& j, const uint8_t* qrow, int64_t g0, int64_t g1, const float* s,
                             const float* z, float* y) {
  const int64_t lanes_per_group = j.a.group_size / 8;
  const int64_t n_lanes = (j.a.K + 7) / 8;
  ChunkDecoder<BITS> dec;
  int64_t l = g0 * lanes_per_group;
  dec.Load(qrow + (l >> 2) * 4 * BITS);
  V8 acc[MM] = {};
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t l1 = std::min(n_lanes, (g + 1) * lanes_per_group);
    const V8 zv = V8{} + z[g - g0];
    V8 t[MM] = {};
    for (; l < l1; ++l) {
      if ((l & 3) == 0) dec.Load(qrow + (l >> 2) * 4 * BITS);
      const V8 w = dec.Lanes(static_cast<int>(l & 3)) - zv;
      for (int m = 0; m < MM; ++m) t[m] += w * Load8(j.xp + m * j.xstride + 8 * l);
    }
    const float sg = s[g - g0];
    for (int m = 0; m < MM; ++m) acc[m] += sg * t[m];
  }
  for (int m = 0; m < MM; ++m) {
    const V8& v = acc[m];
    y[m] += ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  }
}

using GemvRowFn = void (*)(const Job&, const uint8_t*, int64_t, int64_t, const float*, const float*, float*);
template <int BITS>
constexpr GemvRowFn kGemvRowFor[kGemmMinRows] = {nullptr,
                                                 &GemvRow<BITS, 1>,
                                                 &GemvRow<BITS, 2>,
                                                 &GemvRow<BITS, 3>,
                                                 &GemvRow<BITS, 4>,
                                                 &GemvRow<BITS, 5>,
                                                 &GemvRow<BITS, 6>,
                                                 &GemvRow<BITS, 7>};

GemvRowFn GemvRowFor(int64_t bits, int64_t M) {
  return bits == 2 ? kGemvRowFor<2>[M] : bits == 3 ? kGemvRowFor<3>[M] : kGemvRowFor<4>[M];
}

// sum of row n's outliers times x (x in the GEMV path's order, see Job::lane_x).
// Four independent chains: one would wait an FMA latency per outlier (~40 outliers per row at SpQR's 1 %).
SPQR_CPU_CLONES float OutlierDot(const Job& j, int64_t n, const float* x) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const auto term = [&](int32_t p) {
    const int64_t k = j.col_idx[p];
    return HalfToFloat(j.values[p]) * x[j.lane_x ? LanePos(k) : k];
  };
  int32_t p = j.row_ptr[n];
  const int32_t p1 = j.row_ptr[n + 1];
  for (; p + 4 <= p1; p += 4) {
    for (int i = 0; i < 4; ++i) acc[i] += term(p + i);
  }
  for (; p < p1; ++p) acc[0] += term(p);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// GEMM path, one task = rows [n0, n0 + kGemvRows) of W (Y columns; one packed-statistics chunk, so BlockStats
// decodes their statistics at once) for all M rows of X, as tiles of kNr rows.
void TileTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const Attributes& a = j.a;
  const int64_t K = a.K, M = j.M, G = a.n_groups();
  const int64_t n0 = static_cast<int64_t>(task) * kGemvRows;
  const int64_t task_rows = std::min(kGemvRows, a.N - n0);
  const int64_t k_pad = (K + spqr::kChunk - 1) / spqr::kChunk * spqr::kChunk;
  const int64_t m_pad = (M + kMr - 1) / kMr * kMr;
  // Scratch reused by this thread: statistics [kGemvRows, G] x 2, wt [K, kNr], acc [m_pad, kNr], one decoded row.
  thread_local std::vector<float> buf;
  thread_local std::vector<uint8_t> codes;
  buf.resize(std::max(buf.size(), static_cast<size_t>(2 * kGemvRows * G + K * kNr + m_pad * kNr + k_pad)));
  codes.resize(std::max(codes.size(), static_cast<size_t>(k_pad)));
  float* s = buf.data();
  float* z = s + kGemvRows * G;
  float* wt = z + kGemvRows * G;
  float* acc = wt + K * kNr;
  float* row = acc + m_pad * kNr;
  BlockStats(j, n0, 0, G, s, z);
  const float* x[kMr];
  for (int64_t t0 = 0; t0 < task_rows; t0 += kNr) {
    const int rows = static_cast<int>(std::min<int64_t>(kNr, task_rows - t0));
    for (int r = 0; r < kNr; ++r) {
      if (r < rows) {
        DecodeRowWithStats(j, n0 + t0 + r, s + (t0 + r) * G, z + (t0 + r) * G, row, codes.data());
        for (int64_t k = 0; k < K; ++k) wt[k * kNr + r] = row[k];
      } else {
        for (int64_t k = 0; k < K; ++k) wt[k * kNr + r] = 0.f;  // rows past N
      }
    }
    std::fill(acc, acc + m_pad * kNr, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        // Rows past M repeat the last row; their sums land in acc's padding and are never stored.
        for (int i = 0; i < kMr; ++i) x[i] = j.xp + std::min(m0 + i, M - 1) * j.xstride + k0;
        MicroKernel(x, wt + k0 * kNr, kc, acc + m0 * kNr);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t n = n0 + t0 + r;
      const float b = BiasOf(j, n);
      for (int64_t m = 0; m < M; ++m) Store(j, m, n, acc[m * kNr + r] + b);
    }
  }
}

// Outlier values [q0, q1) as fp32 in a thread-local buffer (valid until the next call on this thread): 16 at a time
// where the packed path set halves_to_floats, else one by one.
const float* OutlierValues(const Job& j, int32_t q0, int32_t q1) {
  thread_local std::vector<float> values;
  values.resize(std::max(values.size(), static_cast<size_t>(q1 - q0)));
  if (j.halves_to_floats != nullptr) {
    j.halves_to_floats(j.values + q0, values.data(), q1 - q0);
  } else {
    for (int32_t q = q0; q < q1; ++q) values[q - q0] = HalfToFloat(j.values[q]);
  }
  return values.data();
}

// GEMV path, one task = rows [n0, n0 + kGemvRows) of W for all M (< kGemmMinRows) rows of X.
void GemvTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const Attributes& a = j.a;
  const int64_t M = j.M, G = a.n_groups();
  const int64_t n0 = static_cast<int64_t>(task) * kGemvRows;
  const int64_t rows = std::min(kGemvRows, a.N - n0);
  const int64_t block_groups = std::min(G, std::max<int64_t>(1, kGemvCols / a.group_size));
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, a.bits);
  // Scratch reused by this thread across tasks and calls (statistics are overwritten, y is cleared here).
  thread_local std::vector<float> buf;
  buf.resize(std::max(buf.size(), static_cast<size_t>(2 * block_groups * kGemvRows + kGemvRows * kGemmMinRows)));
  float* s = buf.data();
  float* z = s + block_groups * kGemvRows;
  float* y = z + block_groups * kGemvRows;  // [kGemvRows, M]
  std::fill(y, y + kGemvRows * M, 0.f);
  const GemvRowFn row_fn = GemvRowFor(a.bits, M);
  GemvRowArgs args512;
  args512.x = j.xp;
  args512.xstride = j.xstride;
  args512.K = a.K;
  args512.group_size = a.group_size;
  args512.stats_stride = 1;
  for (int64_t g0 = 0; g0 < G; g0 += block_groups) {
    const int64_t g1 = std::min(G, g0 + block_groups);
    BlockStats(j, n0, g0, g1, s, z);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = r * (g1 - g0);
      const uint8_t* qrow = j.qweight + (n0 + r) * row_bytes;
      if (j.row512 != nullptr) {
        j.row512(args512, qrow, g0, g1, s + at, z + at, y + r * M);
      } else {
        row_fn(j, qrow, g0, g1, s + at, z + at, y + r * M);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const float b = BiasOf(j, n);
    for (int64_t m = 0; m < M; ++m) {
      float v = y[r * M + m];
      if (j.row_ptr != nullptr) v += OutlierDot(j, n, j.xp + m * j.xstride);
      Store(j, m, n, v + b);
    }
  }
}

// y[i] += a * x[i], i < n.
SPQR_CPU_CLONES void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Packed path, one task = Job::packed_task_blocks blocks of 16 rows of W for all M rows of X, in slices of at
// most kPackedMaxRows rows: the slices run one after the other over the task's packed codes, so with several
// slices a task takes about kPackTaskBytes of codes (they stay in L2 while each slice's x table streams past).
constexpr int64_t kPackTaskBlocks = 2;
constexpr int64_t kTransposeMinRows = 4;
constexpr int64_t kPackTaskBytes = 384 * 1024;
constexpr int64_t kPackTaskMaxBlocks = 64;

void PackedTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const int64_t blocks = j.packed.w->blocks;
  const int64_t b0 = static_cast<int64_t>(task) * j.packed_task_blocks;
  const int64_t b1 = std::min(blocks, b0 + j.packed_task_blocks);
  const int64_t stride = j.packed_task_blocks * kPackRows;
  thread_local std::vector<float> ybuf;
  ybuf.resize(std::max(ybuf.size(), static_cast<size_t>(j.M * stride)));
  float* y = ybuf.data();
  for (int64_t m0 = 0, slice = 0; m0 < j.M; m0 += j.packed_rows[slice], ++slice) {
    PackedGemvArgs args = j.packed;
    if (args.xs != nullptr) args.xs += m0 * j.packed_xs_row;
    if (args.xq != nullptr) {
      args.xq += m0 * j.packed_xq_row;
      args.xd += m0 * j.packed_xd_row;
    }
    args.xg += m0 * args.xg_stride;
    args.y = y + m0 * stride;
    args.y_stride = stride;
    j.packed_fns[slice](args, b0, b1);
  }
  const int64_t n0 = b0 * kPackRows, n1 = std::min(j.a.N, b1 * kPackRows);
  if (j.row_ptr != nullptr && j.xt == nullptr) {  // M < kTransposeMinRows: per row of X, a dot per row of W
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = j.xp + m * j.xstride;
      if (j.outlier_rows != nullptr) {
        j.outlier_rows(j.values, j.col_idx, j.row_ptr, x, n0, n1, y + m * stride);
      } else {
        for (int64_t n = n0; n < n1; ++n) y[m * stride + (n - n0)] += OutlierDot(j, n, x);
      }
    }
  } else if (j.row_ptr != nullptr) {  // X transposed: each outlier is one axpy over the M rows
    thread_local std::vector<float> out;  // one row's outlier sums over all M rows of X
    out.resize(std::max(out.size(), static_cast<size_t>(j.M)));
    const int32_t q0 = j.row_ptr[n0];
    const float* values = OutlierValues(j, q0, j.row_ptr[n1]);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(out.begin(), out.begin() + j.M, 0.f);
      for (int32_t p = j.row_ptr[n]; p < j.row_ptr[n + 1]; ++p) {
        Axpy(values[p - q0], j.xt + j.col_idx[p] * j.M, out.data(), j.M);
      }
      for (int64_t m = 0; m < j.M; ++m) y[m * stride + (n - n0)] += out[m];
    }
  }
  float bias[kPackRows * kPackTaskMaxBlocks];
  const int64_t rows = n1 - n0;
  for (int64_t r = 0; r < rows; ++r) bias[r] = BiasOf(j, n0 + r);
  for (int64_t m = 0; m < j.M; ++m) {  // row by row of Y: contiguous stores
    const float* src = y + m * stride;
    if (j.y_f32 != nullptr) {
      float* dst = j.y_f32 + m * j.a.N + n0;
      for (int64_t r = 0; r < rows; ++r) dst[r] = src[r] + bias[r];
    } else {
      for (int64_t r = 0; r < rows; ++r) Store(j, m, n0 + r, src[r] + bias[r]);
    }
  }
}

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

void PackedGemmTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const PackedWeights& pw = *j.packed.w;
  const int64_t b0 = static_cast<int64_t>(task) * j.gemm_blocks, b1 = std::min(pw.blocks, b0 + j.gemm_blocks);
  const int64_t nb = b1 - b0, n0 = b0 * kPackRows, n1 = std::min(j.a.N, b1 * kPackRows);
  const int64_t kpad = pw.chunks * spqr::kChunk, M = j.M, steps = (kpad + kPackedGemmKc - 1) / kPackedGemmKc;
  thread_local std::vector<float> wt, c;
  wt.resize(std::max(wt.size(), static_cast<size_t>(nb * kPackedGemmKc * kPackRows)));
  c.resize(std::max(c.size(), static_cast<size_t>(nb * M * kPackRows)));
  std::fill(c.begin(), c.begin() + nb * M * kPackRows, 0.f);
  // The task's outliers bucketed by step (counting sort): (tile offset within the step, value)
  thread_local std::vector<int32_t> start, at;
  thread_local std::vector<float> val;
  start.assign(static_cast<size_t>(steps + 1), 0);
  if (j.row_ptr != nullptr) {
    const int32_t q0 = j.row_ptr[n0], q1 = j.row_ptr[n1];
    at.resize(std::max(at.size(), static_cast<size_t>(q1 - q0)));
    val.resize(std::max(val.size(), static_cast<size_t>(q1 - q0)));
    for (int32_t q = q0; q < q1; ++q) ++start[j.col_idx[q] / kPackedGemmKc + 1];
    for (int64_t t = 0; t < steps; ++t) start[t + 1] += start[t];
    thread_local std::vector<int32_t> fill;
    fill.assign(start.begin(), start.end() - 1);
    const float* values = OutlierValues(j, q0, q1);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t bi = (n - n0) / kPackRows, r = (n - n0) % kPackRows;
      for (int32_t q = j.row_ptr[n]; q < j.row_ptr[n + 1]; ++q) {
        const int64_t k = j.col_idx[q], t = k / kPackedGemmKc;
        at[fill[t]] = static_cast<int32_t>((bi * kPackedGemmKc + k - t * kPackedGemmKc) * kPackRows + r);
        val[fill[t]++] = values[q - q0];
      }
    }
  }
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t k0 = t * kPackedGemmKc, kc = std::min(kPackedGemmKc, kpad - k0);
    for (int64_t bi = 0; bi < nb; ++bi) {
      j.packed_decode(pw, b0 + bi, k0 / spqr::kChunk, (k0 + kc) / spqr::kChunk,
                      wt.data() + bi * kPackedGemmKc * kPackRows);
    }
    for (int32_t q = start[t]; q < start[t + 1]; ++q) wt[at[q]] += val[q];
    for (int64_t m0 = 0; m0 < M; m0 += kGemmRowsMax) {
      const int64_t mr = std::min<int64_t>(kGemmRowsMax, M - m0);
      for (int64_t bi = 0; bi < nb; ++bi) {
        j.packed_micro[mr](j.xp + m0 * j.xstride + k0, j.xstride, wt.data() + bi * kPackedGemmKc * kPackRows, kc,
                           c.data() + (bi * M + m0) * kPackRows);
      }
    }
  }
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t nb0 = n0 + bi * kPackRows;
    const int rows = static_cast<int>(std::min<int64_t>(kPackRows, n1 - nb0));
    float bias[kPackRows];
    for (int r = 0; r < rows; ++r) bias[r] = BiasOf(j, nb0 + r);
    for (int64_t m = 0; m < M; ++m) {
      const float* src = c.data() + (bi * M + m) * kPackRows;
      if (j.y_f32 != nullptr) {
        float* dst = j.y_f32 + m * j.a.N + nb0;
        for (int r = 0; r < rows; ++r) dst[r] = src[r] + bias[r];
      } else {
        for (int r = 0; r < rows; ++r) Store(j, m, nb0 + r, src[r] + bias[r]);
      }
    }
  }
}

// Rows [m0, m1) of X -> fp32 in stored column order (lane order for the portable GEMV), zero past K.
void ConvertXRows(const void* x, bool half_x, const int32_t* perm, int64_t K, int64_t xstride, bool lane_x,
                  float* xp, int64_t m0, int64_t m1) {
  const float* xf = static_cast<const float*>(x);
  const uint16_t* xh = static_cast<const uint16_t*>(x);
  for (int64_t m = m0; m < m1; ++m) {
    float* dst = xp + m * xstride;
    std::fill(dst + (K & ~int64_t{7}), dst + xstride, 0.f);  // padding past K (lane order stays within 8)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t src = m * K + (perm ? perm[k] : k);
      dst[lane_x ? LanePos(k) : k] = half_x ? HalfToFloat(xh[src]) : xf[src];
    }
  }
}

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
void ConvertTask(void* user, size_t task) {
  const ConvertJob& c = *static_cast<const ConvertJob*>(user);
  const int64_t m0 = static_cast<int64_t>(task) * kConvertRows;
  ConvertXRows(c.x, c.half_x, c.perm, c.K, c.xstride, /*lane_x=*/false, c.xp, m0, std::min(c.M, m0 + kConvertRows));
}

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
  int32_t* xq = nullptr;  // int8 path: xq [M * xq_row], xd [M * chunks]
  float* xd = nullptr;
  float* xs = nullptr;  // fp32 path: xs [M * xs_row]
  float* xg = nullptr;  // [M * G]
  int64_t xq_row = 0, xs_row = 0;
  float* xt = nullptr;  // [K, M], or nullptr
};

void PackedPrepTask(void* user, size_t i) {
  const PackedPrep& p = *static_cast<const PackedPrep*>(user);
  const PackedWeights& pw = *p.pw;
  const int64_t m0 = p.slice_begin[i], mm = p.slice_rows[i];
  ConvertXRows(p.x, p.half_x, p.perm, p.K, p.xstride, /*lane_x=*/false, p.xp, m0, m0 + mm);
  const float* x = p.xp + m0 * p.xstride;
  if (p.xq != nullptr) {
    PackedGemvInt8Inputs(pw, x, p.xstride, mm, p.xq + m0 * p.xq_row, p.xd + m0 * pw.chunks, p.xg + m0 * pw.G, pw.G);
  } else {
    PackedGemvInputs(pw, x, p.xstride, mm, p.xs + m0 * p.xs_row, p.xg + m0 * pw.G, pw.G);
  }
  if (p.xt != nullptr) {  // k outer: each k writes the slice's mm values contiguously (m outer wrote 2 KB apart)
    for (int64_t k = 0; k < p.K; ++k)
      for (int64_t m = m0; m < m0 + mm; ++m) p.xt[k * p.M + m] = p.xp[m * p.xstride + k];
  }
}

// O(N + nnz + K) checks of index inputs that the decode loop trusts (out-of-range indices would read out of bounds).
void CheckIndices(const BoundInputs& b, const Attributes& a, const std::string& prefix) {
  if (b.in[spqr::kRowPtr].present()) {
    const int32_t* rp = b.in[spqr::kRowPtr].as<int32_t>();
    for (int64_t n = 0; n < a.N; ++n) {
      if (rp[n + 1] < rp[n]) {
        throw Ort::Exception(prefix + "outlier_row_ptr must be non-decreasing (row " + std::to_string(n) + ")",
                             ORT_INVALID_ARGUMENT);
      }
    }
    const uint16_t* ci = b.in[spqr::kColIdx].as<uint16_t>();
    for (int64_t p = 0; p < b.nnz; ++p) {
      if (ci[p] >= a.K) {
        throw Ort::Exception(prefix + "outlier_col_idx[" + std::to_string(p) + "]=" + std::to_string(ci[p]) +
                                 " is out of range for K=" + std::to_string(a.K),
                             ORT_INVALID_ARGUMENT);
      }
    }
  }
  if (b.in[spqr::kPerm].present()) {
    const int32_t* perm = b.in[spqr::kPerm].as<int32_t>();
    std::vector<char> seen(static_cast<size_t>(a.K), 0);
    for (int64_t k = 0; k < a.K; ++k) {
      if (perm[k] < 0 || perm[k] >= a.K) {
        throw Ort::Exception(prefix + "perm[" + std::to_string(k) + "]=" + std::to_string(perm[k]) +
                                 " is out of range for K=" + std::to_string(a.K),
                             ORT_INVALID_ARGUMENT);
      }
      if (seen[perm[k]]++) {
        throw Ort::Exception(prefix + "perm is not a permutation: " + std::to_string(perm[k]) + " appears twice (perm[" +
                                 std::to_string(k) + "])",
                             ORT_INVALID_ARGUMENT);
      }
    }
  }
}

struct SpQRMatMulCpuKernel : spqr::KernelBase<SpQRMatMulCpuKernel> {
  SpQRMatMulCpuKernel(const OrtKernelInfo* info, ONNXTensorElementDataType x_type)
      : prefix_(spqr::ErrorPrefix(info)), attrs_(spqr::ReadAttributes(info, prefix_)), x_type_(x_type) {
    // QCOMPILER_CPU_ISA (to test or compare paths): unset/"auto" = the best available; "avx2" = the AVX2 packed
    // GEMV and no AVX-512 code (what a CPU without AVX-512 runs); "avx512-rows" = no pre-packing (AVX-512 row
    // kernel); "portable" = no packing, no AVX-512 code at all. QCOMPILER_CPU_REQUIRE_PACKED=1 makes a
    // decode-sized call fail unless it takes a packed path (tests).
    const char* isa = std::getenv("QCOMPILER_CPU_ISA");
    const std::string isa_s = isa ? isa : "auto";
    use_avx512_ = isa_s != "portable" && isa_s != "avx2";
    allow_packed_ = isa_s != "portable" && isa_s != "avx512-rows";
    packed_avx2_ = isa_s == "avx2" || !PackedAvx512Available();
    // no packed kernel for this CPU (e.g. aarch64): do not build packed weights nobody reads
    allow_packed_ = allow_packed_ && (packed_avx2_ ? PackedAvx2Available() : true);
    const char* req = std::getenv("QCOMPILER_CPU_REQUIRE_PACKED");
    require_packed_ = req != nullptr && std::string(req) == "1";
    Ort::ConstKernelInfo ki(info);
    for (size_t i = 1; i < spqr::kNumInputs; ++i) {
      int is_constant = 0;
      try {
        ki.GetTensorConstantInput(i, &is_constant);
      } catch (const Ort::Exception&) {
        is_constant = 0;  // omitted optional input (or an ORT without the query): treated as fed at run time
      }
      constant_[i] = is_constant != 0;
    }
    // The packed decode path needs the weight tensors to be initializers (packed once, reused every call).
    allow_packed_ = allow_packed_ && Packable(attrs_) && constant_[spqr::kQWeight] && constant_[spqr::kScales] &&
                    constant_[spqr::kZeros] && (attrs_.stat_bits == 0 || constant_[spqr::kStats2]);
    // accuracy_level 4: int8 activations where a packed int8 kernel runs (AVX512-VNNI; AVX2 on CPUs without
    // AVX-512), else fp32 as level 0 (AVX-512 without VNNI, portable builds).
    int8_ = allow_packed_ && attrs_.accuracy_level == 4 &&
            (packed_avx2_ ? PackedAvx2Available() : PackedInt8Available());
  }

  // The packed weights, built on the first decode-sized call from that call's (constant) inputs.
  const PackedWeights& Packed(const BoundInputs& b) {
    std::call_once(pack_once_, [&] {
      packed_ = std::make_unique<PackedWeights>(
          Pack(attrs_, b.in[spqr::kQWeight].as<uint8_t>(), b.in[spqr::kScales].data, b.in[spqr::kZeros].data,
               b.in[spqr::kStats2].present() ? b.in[spqr::kStats2].as<uint16_t>() : nullptr, int8_));
    });
    return *packed_;
  }

  // float32 scales/zeros (stat_bits 0) → fp16, which every path below reads: once per session for initializers,
  // into `local` for inputs fed at run time.
  void HalveStats(BoundInputs& b, std::array<std::vector<uint16_t>, 2>& local) {
    for (size_t j = 0; j < 2; ++j) {
      spqr::TensorArg& t = b.in[j == 0 ? spqr::kScales : spqr::kZeros];
      if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) continue;
      const bool constant = constant_[j == 0 ? spqr::kScales : spqr::kZeros];
      auto convert = [&](std::vector<uint16_t>& out) {
        const float* src = t.as<float>();
        out.resize(static_cast<size_t>(t.numel()));
        for (size_t k = 0; k < out.size(); ++k) out[k] = Ort::Float16_t(src[k]).val;
      };
      if (constant) {
        std::call_once(halved_once_[j], [&] { convert(halved_[j]); });
        t.data = halved_[j].data();
      } else {
        convert(local[j]);
        t.data = local[j].data();
      }
      t.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
  }

  void Compute(OrtKernelContext* context) {
    const Attributes& a = attrs_;
    BoundInputs b = spqr::BindInputs(context, a, x_type_, prefix_, /*host_data=*/true);
    std::array<std::vector<uint16_t>, 2> halved_local;
    if (a.stat_bits == 0) HalveStats(b, halved_local);
    // Index inputs that are initializers are checked on the first call only; inputs fed at run time every call.
    bool per_call = false;
    for (size_t i : {spqr::kRowPtr, spqr::kColIdx, spqr::kPerm}) per_call |= b.in[i].present() && !constant_[i];
    if (per_call || !indices_checked_.load(std::memory_order_acquire)) {
      CheckIndices(b, a, prefix_);
      if (!per_call) indices_checked_.store(true, std::memory_order_release);
    }
    Ort::KernelContext ctx(context);
    Ort::UnownedValue y = ctx.GetOutput(0, b.y_shape);
    if (b.M == 0) return;

    // X -> fp32 in stored column order (the GEMV path: in its lane order within each 8 columns).
    const int64_t M = b.M, K = a.K;
    // The packed path (any M): X in near-equal slices of at most kPackedMaxRows rows.
    std::vector<int64_t> slice_rows;
    std::vector<PackedGemvFn> slice_fns;
    // The packed prefill path (fp32 activations, UsePackedGemm): each block decoded once, then a GEMM.
    const PackedDecodeFn gemm_decode = allow_packed_ && !packed_avx2_ && !int8_ && UsePackedGemm(M, K, a.N)
                                           ? PackedDecodeAvx512(Packed(b))
                                           : nullptr;
    // AVX2 (no AVX-512): the packed GEMV in slices of up to 4 rows for decode-sized M; the portable GEMM above that
    if (allow_packed_ && gemm_decode == nullptr && (!packed_avx2_ || M < kGemmMinRows)) {
      const PackedWeights& pw = Packed(b);
      const int64_t max_rows = packed_avx2_ ? kPackedAvx2MaxRows : kPackedMaxRows;
      const int64_t slices = (M + max_rows - 1) / max_rows;
      for (int64_t i = 0; i < slices; ++i) {
        slice_rows.push_back(M / slices + (i < M % slices ? 1 : 0));
        const int64_t rows = slice_rows.back();
        slice_fns.push_back(int8_ ? (packed_avx2_ ? PackedGemvInt8Avx2(pw, rows) : PackedGemvVnni(pw, rows))
                                  : (packed_avx2_ ? PackedGemvAvx2(pw, rows) : PackedGemvAvx512(pw, rows)));
        if (slice_fns.back() == nullptr) {
          slice_fns.clear();
          break;
        }
      }
    }
    const bool packed_path = !slice_fns.empty() || gemm_decode != nullptr;
    if (require_packed_ && !packed_path) {
      throw Ort::Exception(prefix_ + "QCOMPILER_CPU_REQUIRE_PACKED=1 but the packed path is not available",
                           ORT_FAIL);
    }
    const bool gemv = !packed_path && M < kGemmMinRows && a.group_size % 8 == 0;
    const GemvRowAvx512Fn row512 = gemv && use_avx512_ && a.group_size % 16 == 0 ? GemvRowAvx512(a.bits, M) : nullptr;
    const bool lane_x = gemv && row512 == nullptr;
    const int64_t xstride = (K + spqr::kChunk - 1) / spqr::kChunk * spqr::kChunk;
    // Per-call scratch lives on (thread_local, grow-only): fresh large buffers would be new pages every call, and
    // the kernel's page faults cost more than the matmul at prefill sizes.
    thread_local std::vector<float> xp;
    xp.resize(std::max(xp.size(), static_cast<size_t>(M * xstride)));
    const bool half_x = x_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const int32_t* perm = b.in[spqr::kPerm].present() ? b.in[spqr::kPerm].as<int32_t>() : nullptr;
    if (!packed_path) ConvertXRows(b.in[spqr::kX].data, half_x, perm, K, xstride, lane_x, xp.data(), 0, M);

    Job j;
    j.a = a;
    j.M = M;
    j.qweight = b.in[spqr::kQWeight].as<uint8_t>();
    j.scales = b.in[spqr::kScales].data;
    j.zeros = b.in[spqr::kZeros].data;
    j.stats2 = b.in[spqr::kStats2].present() ? b.in[spqr::kStats2].as<uint16_t>() : nullptr;
    if (b.in[spqr::kRowPtr].present()) {
      j.row_ptr = b.in[spqr::kRowPtr].as<int32_t>();
      j.col_idx = b.in[spqr::kColIdx].as<uint16_t>();
      j.values = b.in[spqr::kValues].as<uint16_t>();
    }
    if (b.in[spqr::kBias].present()) {
      if (b.in[spqr::kBias].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        j.bias_f32 = b.in[spqr::kBias].as<float>();
      } else {
        j.bias_f16 = b.in[spqr::kBias].as<uint16_t>();
      }
    }
    j.xp = xp.data();
    j.xstride = xstride;
    j.lane_x = lane_x;
    j.row512 = row512;
    if (half_x) {
      j.y_f16 = reinterpret_cast<uint16_t*>(y.GetTensorMutableData<Ort::Float16_t>());
    } else {
      j.y_f32 = y.GetTensorMutableData<float>();
    }
    thread_local std::vector<float> packed_x, xt;
    thread_local std::vector<int32_t> packed_xq;
    if (gemm_decode != nullptr) {
      // rows of X 64 bytes more than whole chunks apart: the micro-kernel reads kGemmRowsMax rows at once, which a
      // stride of a multiple of 4 KB would put in one L1 set (K = 4096 ran at 2/3 of the speed)
      const int64_t gstride = xstride + 16;
      xp.resize(std::max(xp.size(), static_cast<size_t>(M * gstride)));
      j.xp = xp.data();
      j.xstride = gstride;
      ConvertJob conv{b.in[spqr::kX].data, half_x, perm, K, gstride, xp.data(), M};
      ctx.ParallelFor(&ConvertTask, static_cast<size_t>((M + kConvertRows - 1) / kConvertRows), 0, &conv);
      j.packed.w = packed_.get();
      j.packed_decode = gemm_decode;
      for (int mr = 1; mr <= kGemmRowsMax; ++mr) j.packed_micro[mr] = PackedMicroAvx512(mr);
      j.halves_to_floats = HalvesToFloatsAvx512();
      // blocks per task: X is read once per task; at least 12 tasks (where there are 12 blocks) so that 2, 3, 4 or 6
      // threads get equal shares (N = 576: 36 blocks as 9 tasks of 4 left one of 2 threads a task behind; as 12
      // tasks of 3, 576x576 at M = 64 took 288 instead of 331 us, medians of 4 alternating runs; 1536x576 within the
      // noise, 782 against 774 us; M = 512 unchanged)
      j.gemm_blocks = std::clamp<int64_t>((packed_->blocks + 11) / 12, 1, kPackedGemmMaxBlocks);
      ctx.ParallelFor(&PackedGemmTask, static_cast<size_t>((packed_->blocks + j.gemm_blocks - 1) / j.gemm_blocks), 0,
                      &j);
      return;
    }
    if (packed_path) {
      const PackedWeights& pw = *packed_;
      PackedPrep prep;
      prep.x = b.in[spqr::kX].data;
      prep.half_x = half_x;
      prep.perm = perm;
      prep.K = K;
      prep.M = M;
      prep.xstride = xstride;
      prep.xp = xp.data();
      prep.pw = &pw;
      std::vector<int64_t> slice_begin(slice_rows.size());
      for (size_t i = 1; i < slice_rows.size(); ++i) slice_begin[i] = slice_begin[i - 1] + slice_rows[i - 1];
      prep.slice_rows = slice_rows.data();
      prep.slice_begin = slice_begin.data();
      if (int8_) {  // xq [M * chunks * 8] int32, then xd [M * chunks] and xg [M * G] fp32
        prep.xq_row = pw.chunks * 8;
        packed_xq.resize(std::max(packed_xq.size(), static_cast<size_t>(M * prep.xq_row)));
        packed_x.resize(std::max(packed_x.size(), static_cast<size_t>(M * (pw.chunks + pw.G))));
        prep.xq = packed_xq.data();
        prep.xd = packed_x.data();
        prep.xg = prep.xd + M * pw.chunks;
        j.packed.xq = prep.xq;
        j.packed.xd = prep.xd;
        j.packed_xq_row = prep.xq_row;
        j.packed_xd_row = pw.chunks;
      } else {  // xs [M * xs_row], then xg [M * G]
        prep.xs_row = pw.chunks * PiecesPerChunk(static_cast<int>(pw.bits));
        packed_x.resize(std::max(packed_x.size(), static_cast<size_t>(M * (prep.xs_row + pw.G))));
        prep.xs = packed_x.data();
        prep.xg = prep.xs + M * prep.xs_row;
        j.packed.xs = prep.xs;
        j.packed_xs_row = prep.xs_row;
      }
      j.packed.xg = prep.xg;
      j.packed.xg_stride = pw.G;
      if (j.row_ptr != nullptr && M >= kTransposeMinRows) {
        xt.resize(std::max(xt.size(), static_cast<size_t>(K * M)));
        prep.xt = xt.data();
        j.xt = prep.xt;
      }
      if (slice_rows.size() == 1) {
        PackedPrepTask(&prep, 0);
      } else {
        ctx.ParallelFor(&PackedPrepTask, slice_rows.size(), 0, &prep);
      }
      j.packed_rows = std::move(slice_rows);
      j.packed_fns = std::move(slice_fns);
      j.packed.w = &pw;
      j.outlier_rows = PackedOutlierRowsF16c();
      j.halves_to_floats = HalvesToFloatsAvx512();
      j.packed_task_blocks = kPackTaskBlocks;
      if (j.packed_rows.size() > 1) {  // several slices: bigger tasks (at least 8 of them)
        const int64_t block_bytes = pw.chunks * (int8_ ? 4 : pw.bits) * kPackRows * 4;
        j.packed_task_blocks = std::clamp(std::min(kPackTaskBytes / block_bytes, (pw.blocks + 7) / 8), kPackTaskBlocks,
                                          kPackTaskMaxBlocks);
      }
      const int64_t tasks = (pw.blocks + j.packed_task_blocks - 1) / j.packed_task_blocks;
      ctx.ParallelFor(&PackedTask, static_cast<size_t>(tasks), 0, &j);
      return;
    }
    if (M >= kGemmMinRows) {
      ctx.ParallelFor(&TileTask, static_cast<size_t>((a.N + kGemvRows - 1) / kGemvRows), 0, &j);
      return;
    }
    if (gemv) {
      ctx.ParallelFor(&GemvTask, static_cast<size_t>((a.N + kGemvRows - 1) / kGemvRows), 0, &j);
      return;
    }
    // ~64 rows of work per task for GEMV-sized calls, fewer rows when each row serves many X rows.
    // (a multiple of kRowBlock).
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(64, a.N / 64) / std::max<int64_t>(1, M / 8));
    j.rows_per_task = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
    const int64_t tasks = (a.N + j.rows_per_task - 1) / j.rows_per_task;
    ctx.ParallelFor(&RowBlockTask, static_cast<size_t>(tasks), 0, &j);
  }

 private:
  std::string prefix_;
  Attributes attrs_;
  ONNXTensorElementDataType x_type_;
  bool use_avx512_ = true;
  bool allow_packed_ = true;
  bool packed_avx2_ = false;  // the AVX2 packed kernels (no AVX-512 on this CPU, or QCOMPILER_CPU_ISA=avx2)
  bool require_packed_ = false;
  bool int8_ = false;
  std::once_flag pack_once_;
  std::array<std::once_flag, 2> halved_once_;       // float32 scales / zeros initializers converted to fp16
  std::array<std::vector<uint16_t>, 2> halved_;
  std::unique_ptr<PackedWeights> packed_;
  std::array<bool, spqr::kNumInputs> constant_{};  // input i is an initializer (same data on every call)
  std::atomic<bool> indices_checked_{false};       // constant index inputs already validated
};

}  // namespace

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const spqr::SpQRMatMulOp<SpQRMatMulCpuKernel> op_f32("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static const spqr::SpQRMatMulOp<SpQRMatMulCpuKernel> op_f16("CPUExecutionProvider",
                                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_f32);
  domain.Add(&op_f16);
}

}  // namespace Cpu
}  // namespace qcompiler
