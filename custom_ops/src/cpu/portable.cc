// The portable CPU kernels (GCC/Clang vector extensions, 8 lanes; an AVX2 + FMA clone picked at load time on
// x86-64): every build has them, and every ISA falls back to them (cpu_kernels.h). On the stored layout, W decoded
// row by row (codes -> s*(q - z) with that row's group statistics, then the row's outliers added) in stored
// (permuted) column order; X already converted to fp32 and permuted by the op (ConvertXRows). Three paths, each split
// over output rows n with ORT's intra-op thread pool:
// - GEMV (M < kGemmMinRows, decode; group_size a multiple of 8): each task takes kGemvRows rows of W (one packed
//   statistics chunk along N) and K in blocks of whole groups. It decodes the block's first-level statistics for its
//   rows once (vectorized over the 32 rows of a packed chunk), then streams each row's packed codes 8 at a time
//   (u8 -> fp32 lanes), computing sum_g s_g * sum_k (q_k - z_g) x_k with vector accumulators (or the ISA's row
//   kernel, Job::row512); outliers are added from their CSR rows afterwards. Nothing of W is materialized;
// - rows (the fallback for other group sizes): each task decodes kRowBlock rows of W at a time and dots them with
//   each X row;
// - GEMM (prefill): each task decodes a tile of kNr rows of W once, transposed to [K, kNr], and multiplies it with
//   all of X by a kMr x kNr register-blocked micro-kernel (X values broadcast, W rows as vectors), K in blocks of
//   kKc so the tile block stays in L1; partial sums live in an [M, kNr] fp32 buffer of the task.
#include "cpu/clones.h"
#include "cpu/cpu_job.h"
#include "cpu/cpu_kernels.h"

#include <algorithm>
#include <memory>
#include <vector>

namespace qcompiler {
namespace Cpu {

using spqr::Attributes;

namespace {

typedef float V8 __attribute__((vector_size(32)));  // 8 fp32 lanes: one AVX register, or two SSE/NEON ones

// GEMM path: X rows per micro-tile, W rows per tile (two V8 per X row: 12 accumulators fit AVX2's 16 registers),
// K per cache block, and the smallest M that takes it.
constexpr int kMr = 6;
constexpr int kNr = 16;
constexpr int64_t kKc = 256;

// GEMV path: about this many K columns per block (rounded to whole groups; the block's statistics, 2 x 32 floats per
// group, stay in L1).
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
  const uint8_t* bytes = nullptr;  // BITS=8: the chunk (each lane group loads its own 8 bytes)

  void Load(const uint8_t* chunk) {
    if (BITS == 8) {
      bytes = chunk;
      return;
    }
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
    if (BITS == 8) {  // bytes 8s..8s+7 as {w0, w1} words: lane i reads byte i/2 of word i%2, code 8s + kLaneCode[i]
      v = (Words(bytes + 8 * s) >> byte_shift) & 255u;
    } else if (BITS == 4) {
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
QC_X86_CLONES
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
QC_X86_CLONES
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
QC_X86_CLONES void DecodeRowWithStats(const Job& j, int64_t n, const float* s, const float* z, float* w,
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

}  // namespace

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

namespace {

// Whether BlockStats decodes quantized statistics 8 rows at a time (each 8 rows must share their second-level
// statistics).
inline bool StatsDecodedEightRowsAtOnce(const Attributes& a) {
  return a.stat_bits != 0 && a.stat_group_size % 8 == 0;
}

// BlockStats for quantized statistics with stat_group_size % 8 == 0: 8 rows per vector, in lane order.
template <int SB>
QC_X86_CLONES void BlockStatsLanes(const Job& j, int64_t n0, int64_t g0, int64_t g1, float* s, float* z) {
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
QC_X86_CLONES void GemvRow(const Job& j, const uint8_t* qrow, int64_t g0, int64_t g1, const float* s,
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
  return bits == 2 ? kGemvRowFor<2>[M] : bits == 3 ? kGemvRowFor<3>[M] : bits == 8 ? kGemvRowFor<8>[M]
                                                                         : kGemvRowFor<4>[M];
}

}  // namespace

// sum of row n's outliers times x (x in the GEMV path's order, see Job::lane_x).
// Four independent chains: one would wait an FMA latency per outlier (~40 outliers per row at SpQR's 1 %).
QC_X86_CLONES float OutlierDot(const Job& j, int64_t n, const float* x) {
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

// Rows [m0, m1) of X -> fp32 in stored column order (lane order for the portable GEMV), zero past K.
QC_X86_CLONES void ConvertXRows(const void* x, bool half_x, const int32_t* perm, int64_t K, int64_t xstride,
                                bool lane_x, float* xp, int64_t m0, int64_t m1) {
  const float* xf = static_cast<const float*>(x);
  const uint16_t* xh = static_cast<const uint16_t*>(x);
  for (int64_t m = m0; m < m1; ++m) {
    float* dst = xp + m * xstride;
    std::fill(dst + (K & ~int64_t{7}), dst + xstride, 0.f);  // padding past K (lane order stays within 8)
    if (!half_x && !lane_x) {  // the packed paths' case, as loops the clones vectorize (a gather with perm)
      const float* row = xf + m * K;
      if (perm != nullptr) {
        for (int64_t k = 0; k < K; ++k) dst[k] = row[perm[k]];
      } else {
        std::copy(row, row + K, dst);
      }
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t src = m * K + (perm ? perm[k] : k);
      dst[lane_x ? LanePos(k) : k] = half_x ? HalfToFloat(xh[src]) : xf[src];
    }
  }
}

// The portable table (cpu_kernels.h): no ISA kernels, so the op runs the paths above.
const CpuKernels& PortableKernels() {
  static const CpuKernels k;
  return k;
}

}  // namespace Cpu
}  // namespace qcompiler
