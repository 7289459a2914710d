// AVX-512 GEMV on pre-packed weights (layout in packed.h): 16 output rows per vector, per 16 weights one AND, one
// unsigned conversion and one FMA per row of X (x broadcast from the pre-scaled table; the field's power of two
// cancels exactly). Per group: y += s * (sum_k q_k x_k - z * sum_k x_k), the scale and zero of the 16 rows decoded
// from their codes (or loaded) once per group. Functions carry target attributes (no -m flags for the file), so
// nothing here runs on CPUs without AVX-512.
#include "cpu/cpu_kernels.h"
#include "cpu/packed.h"

#include <algorithm>
#include <cstring>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC's _mm512_cvtepu32_ps passes an undefined vector as the (unused) merge source: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define QC_HAVE_AVX512_BUILD 1
#define QC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define QC_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), always_inline)) inline
#define QC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#endif

namespace qcompiler {
namespace Cpu {

#if defined(QC_HAVE_AVX512_BUILD)
namespace {

// Chunks of codes ahead of the one in use that the kernels prefetch.
constexpr int64_t kPrefetchChunks = 8;

// Accumulators per row of X and half-chunk (independent FMA chains: 4 for one row, fewer when rows interleave).
template <int MM>
constexpr int kChains = MM == 1 ? 4 : MM == 2 ? 2 : 1;

template <int BITS, int MM, bool HALF>
struct ChunkAcc {
  __m512 v[HALF ? 2 : 1][MM][kChains<MM>];
};

template <int BITS, int MM, bool HALF, int P>
QC_AVX512_INLINE void OnePiece(const __m512i* d, const float* xs, ChunkAcc<BITS, MM, HALF>& acc) {
  constexpr Piece pc = PieceOf(BITS, P);
  constexpr uint32_t mask = ((1u << pc.width) - 1u) << pc.shift;
  constexpr int h = HALF && pc.code >= 16 ? 1 : 0;
  constexpr int chain = P % kChains<MM>;
  const __m512 v = _mm512_cvtepu32_ps(_mm512_and_si512(d[pc.word], _mm512_set1_epi32(static_cast<int>(mask))));
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    acc.v[h][m][chain] = _mm512_fmadd_ps(v, _mm512_set1_ps(xs[P * MM + m]), acc.v[h][m][chain]);
  }
}

template <int BITS, int MM, bool HALF, size_t... Ps>
QC_AVX512_INLINE void AllPieces(const __m512i* d, const float* xs, ChunkAcc<BITS, MM, HALF>& acc,
                                std::index_sequence<Ps...>) {
  (OnePiece<BITS, MM, HALF, static_cast<int>(Ps)>(d, xs, acc), ...);
}

// The scale s and zero z of the 16 rows of block blk, group g: w = s * (q - z), the quantizer's own expression.
template <bool CODED>
QC_AVX512_INLINE void GroupStats(const PackedWeights& w, int64_t blk, int64_t g, __m512& s, __m512& z) {
  if (CODED) {
    const __m512i c = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.stat_codes.data() + (blk * w.G + g) * kPackRows)));
    const float* v = CodedStatValues(w, blk, g);
    s = _mm512_mul_ps(_mm512_set1_ps(v[0]),
                      _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15))), _mm512_set1_ps(v[1])));
    z = _mm512_mul_ps(_mm512_set1_ps(v[2]), _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), _mm512_set1_ps(v[3])));
  } else if (w.half_stats) {
    const uint16_t* v = w.stat_halves.data() + (blk * w.G + g) * 2 * kPackRows;
    s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + kPackRows)));
  } else {
    const float* v = w.stat_values.data() + (blk * w.G + g) * 2 * kPackRows;
    s = _mm512_loadu_ps(v);
    z = _mm512_loadu_ps(v + kPackRows);
  }
}

// y[m] += s * (t[m] - z * xg[m][g]) for the 16 rows of block `blk`, group g.
template <int MM, bool CODED>
QC_AVX512_INLINE void FinishGroup(const PackedGemvArgs& a, int64_t blk, int64_t g, const __m512* t, __m512* y) {
  __m512 s, z;
  GroupStats<CODED>(*a.w, blk, g, s, z);
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    const __m512 d = _mm512_fnmadd_ps(z, _mm512_set1_ps(a.xg[m * a.xg_stride + g]), t[m]);
    y[m] = _mm512_fmadd_ps(s, d, y[m]);
  }
}

template <int BITS, int MM, bool HALF>
QC_AVX512_INLINE void SumChains(const ChunkAcc<BITS, MM, HALF>& acc, int h, __m512* t) {
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    __m512 v = acc.v[h][m][0];
    for (int i = 1; i < kChains<MM>; ++i) v = _mm512_add_ps(v, acc.v[h][m][i]);
    t[m] = v;
  }
}

template <int BITS, int MM, bool HALF, bool CODED>
QC_AVX512 void Gemv(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int P = PiecesPerChunk(BITS);
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* codes = w.codes.data() + blk * w.chunks * BITS * kPackRows;
    __m512 y[MM];
    for (int m = 0; m < MM; ++m) y[m] = _mm512_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += HALF ? 2 : 1) {
      ChunkAcc<BITS, MM, HALF> acc;
      for (auto& half : acc.v)
        for (auto& row : half)
          for (auto& v : row) v = _mm512_setzero_ps();
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        __m512i d[BITS];
        for (int i = 0; i < BITS; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(codes + ((c + kPrefetchChunks) * BITS + i) * kPackRows),
                       _MM_HINT_T0);
          d[i] = _mm512_loadu_si512(codes + (c * BITS + i) * kPackRows);
        }
        AllPieces<BITS, MM, HALF>(d, a.xs + c * P * MM, acc, std::make_index_sequence<P>{});
      }
      __m512 t[MM];
      SumChains<BITS, MM, HALF>(acc, 0, t);
      FinishGroup<MM, CODED>(a, blk, g, t, y);
      if (HALF && g + 1 < w.G) {
        SumChains<BITS, MM, HALF>(acc, 1, t);
        FinishGroup<MM, CODED>(a, blk, g + 1, t, y);
      }
    }
    for (int m = 0; m < MM; ++m) _mm512_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows, y[m]);
  }
}

// int8 path: per chunk and row of X, sum_k q_k xq_k in int32 by vpdpbusd (4 columns per lane and instruction),
// converted and scaled by the chunk's X scale (each half-chunk's with 16-column groups, XScalesPerChunk); then per
// group as the fp32 path.
template <int MM, bool HALF, bool CODED>
QC_VNNI void GemvInt8(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;
  constexpr int NC = MM == 1 ? 2 : 1;  // integer chains per half and row
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* nib = w.nibbles.data() + blk * w.chunks * 4 * kPackRows;
    __m512 y[MM];
    for (int m = 0; m < MM; ++m) y[m] = _mm512_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
      __m512 t[H][MM];
      for (int h = 0; h < H; ++h)
        for (int m = 0; m < MM; ++m) t[h][m] = _mm512_setzero_ps();
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        __m512i acc[H][MM][NC];
        for (int h = 0; h < H; ++h)
          for (int m = 0; m < MM; ++m)
            for (int i = 0; i < NC; ++i) acc[h][m][i] = _mm512_setzero_si512();
        const int32_t* xq = a.xq + c * 8 * MM;
        for (int i = 0; i < 4; ++i) {  // the codes kPrefetchChunks ahead (4 cache lines per chunk)
          _mm_prefetch(reinterpret_cast<const char*>(nib + ((c + kPrefetchChunks) * 4 + i) * kPackRows), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512i z = _mm512_loadu_si512(nib + (c * 4 + i) * kPackRows);
          const __m512i lo = _mm512_and_si512(z, low4);
          // one row: the high nibbles stay in place (16 q: products up to 240 * 127, exact in int32) and their
          // chain is shifted back once per half-chunk; with rows interleaved they share the low chain, so shift.
          const __m512i hi = NC == 2 ? _mm512_and_si512(z, high4) : _mm512_and_si512(_mm512_srli_epi16(z, 4), low4);
          const int h = HALF && i >= 2 ? 1 : 0;
#pragma GCC unroll 8
          for (int m = 0; m < MM; ++m) {
            acc[h][m][0] = _mm512_dpbusd_epi32(acc[h][m][0], lo, _mm512_set1_epi32(xq[(2 * i) * MM + m]));
            acc[h][m][NC - 1] =
                _mm512_dpbusd_epi32(acc[h][m][NC - 1], hi, _mm512_set1_epi32(xq[(2 * i + 1) * MM + m]));
          }
        }
        for (int h = 0; h < H; ++h) {
#pragma GCC unroll 8
          for (int m = 0; m < MM; ++m) {
            __m512i v = acc[h][m][0];
            if (NC == 2) v = _mm512_add_epi32(v, _mm512_srai_epi32(acc[h][m][NC - 1], 4));  // exact: a multiple of 16
            t[h][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(a.xd[(c * H + h) * MM + m]), t[h][m]);
          }
        }
      }
      FinishGroup<MM, CODED>(a, blk, g, t[0], y);
      if (HALF && g + 1 < w.G) FinishGroup<MM, CODED>(a, blk, g + 1, t[H - 1], y);
    }
    for (int m = 0; m < MM; ++m) _mm512_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows, y[m]);
  }
}

// The scale and zero of codes 0..15 in block blk, group g: s[i] = v0 (i - v1), z[i] = v2 (i - v3), GroupStats'
// expressions (the same operations in the same order, so the same values); a vpermps by the codes then gives the 16
// rows' s and z.
struct StatTables {
  __m512 s, z;
};

QC_AVX512_INLINE StatTables MakeStatTables(const float* v) {
  const __m512 iota = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  return {_mm512_mul_ps(_mm512_set1_ps(v[0]), _mm512_sub_ps(iota, _mm512_set1_ps(v[1]))),
          _mm512_mul_ps(_mm512_set1_ps(v[2]), _mm512_sub_ps(iota, _mm512_set1_ps(v[3])))};
}

// y += s * (t - z * xg) with s, z looked up from the block's codes (scale code | zero code << 4, one byte per row).
QC_AVX512_INLINE void FinishGroupTables(const StatTables& tab, const uint8_t* codes, float xg, __m512 t, __m512& y) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512 s = _mm512_permutexvar_ps(c, tab.s);  // vpermps reads the index's low 4 bits: the scale code
  const __m512 z = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), tab.z);
  y = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_set1_ps(xg), t), y);
}

// The int8 path at M = 1 with coded statistics, two blocks (32 rows) per pass: the x words, the chunk scales and the
// group sums are loaded once for both, and the statistics tables are built once when the two blocks share their
// second-level group (β2 ≥ 32). A trailing odd block takes GemvInt8. Same arithmetic as GemvInt8<1, HALF, true>.
template <bool HALF>
QC_VNNI void GemvInt8Pair(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const int64_t block_words = w.chunks * 4 * kPackRows;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  int64_t blk = b0;
  for (; blk + 2 <= b1; blk += 2) {
    const uint32_t* nib[2] = {w.nibbles.data() + blk * block_words, w.nibbles.data() + (blk + 1) * block_words};
    const bool shared = (blk >> w.stat_shift) == ((blk + 1) >> w.stat_shift);
    // the next pair's statistics, prefetched below (none past this task's last pair)
    const bool next_pair = blk + 4 <= b1;
    const char* next_stat_codes =
        reinterpret_cast<const char*>(w.stat_codes.data() + (next_pair ? (blk + 2) * w.G * kPackRows : 0));
    const int64_t stat_code_bytes = next_pair ? 2 * w.G * kPackRows : 0;
    const char* next_stat_values =
        reinterpret_cast<const char*>(w.stat_values.data() + (next_pair ? ((blk + 2) >> w.stat_shift) * w.G * 4 : 0));
    const int64_t stat_value_bytes =
        next_pair ? (((blk + 3) >> w.stat_shift) - ((blk + 2) >> w.stat_shift) + 1) * w.G * 4 * 4 : 0;
    __m512 y[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
      __m512 t[2][H];
      for (auto& tb : t)
        for (auto& v : tb) v = _mm512_setzero_ps();
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        __m512i acc[2][H][2];  // [block][half][low, high nibbles]
        for (auto& ab : acc)
          for (auto& ah : ab)
            for (auto& v : ah) v = _mm512_setzero_si512();
        const int32_t* xq = a.xq + c * 8;
        // The codes kPrefetchChunks ahead in both blocks' streams, running on into the next pair's two blocks (with
        // K = 576, 18 chunks a block, the first 8 chunks of every pair had been left to the hardware prefetcher), and
        // one line a chunk of the next pair's statistics (codes and second-level values: short streams that start
        // anew every pair).
        const int64_t pc = c + kPrefetchChunks;
        const int64_t ahead = pc < w.chunks ? pc * 4 * kPackRows : 2 * block_words + (pc - w.chunks) * 4 * kPackRows;
        for (int b = 0; b < 2; ++b) {
          for (int i = 0; i < 4; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(nib[b] + ahead + i * kPackRows), _MM_HINT_T0);
          }
        }
        if (c * 64 < stat_code_bytes) _mm_prefetch(next_stat_codes + c * 64, _MM_HINT_T0);
        if (c * 64 < stat_value_bytes) _mm_prefetch(next_stat_values + c * 64, _MM_HINT_T0);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512i xl = _mm512_set1_epi32(xq[2 * i]), xh = _mm512_set1_epi32(xq[2 * i + 1]);
          const int h = HALF && i >= 2 ? 1 : 0;
          for (int b = 0; b < 2; ++b) {
            const __m512i z = _mm512_loadu_si512(nib[b] + (c * 4 + i) * kPackRows);
            acc[b][h][0] = _mm512_dpbusd_epi32(acc[b][h][0], _mm512_and_si512(z, low4), xl);
            acc[b][h][1] = _mm512_dpbusd_epi32(acc[b][h][1], _mm512_and_si512(z, high4), xh);  // 16 q: see GemvInt8
          }
        }
        for (int b = 0; b < 2; ++b) {
          for (int h = 0; h < H; ++h) {
            const __m512i v = _mm512_add_epi32(acc[b][h][0], _mm512_srai_epi32(acc[b][h][1], 4));
            t[b][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(a.xd[c * H + h]), t[b][h]);
          }
        }
      }
      for (int h = 0; h < H && g + h < w.G; ++h) {
        const StatTables t0 = MakeStatTables(CodedStatValues(w, blk, g + h));
        const StatTables t1 = shared ? t0 : MakeStatTables(CodedStatValues(w, blk + 1, g + h));
        const float xg = a.xg[g + h];
        FinishGroupTables(t0, w.stat_codes.data() + (blk * w.G + g + h) * kPackRows, xg, t[0][h], y[0]);
        FinishGroupTables(t1, w.stat_codes.data() + ((blk + 1) * w.G + g + h) * kPackRows, xg, t[1][h], y[1]);
      }
    }
    _mm512_storeu_ps(a.y + (blk - b0) * kPackRows, y[0]);
    _mm512_storeu_ps(a.y + (blk + 1 - b0) * kPackRows, y[1]);
  }
  if (blk < b1) {
    PackedGemvArgs tail = a;
    tail.y = a.y + (blk - b0) * kPackRows;
    GemvInt8<1, HALF, true>(tail, blk, b1);
  }
}

// ---- prefill: decode a block to a column-major tile, then a 16-column micro-kernel ----

// Code C of a chunk (d: its BITS words) for the 16 rows: its piece(s) (3-bit codes 30 and 31 straddle two words)
// as exact floats, then w = s * (q - z) into dst[16 C].
template <int BITS, int P>
QC_AVX512_INLINE __m512 PieceValue(const __m512i* d) {
  constexpr Piece pc = PieceOf(BITS, P);
  constexpr uint32_t mask = ((1u << pc.width) - 1u) << pc.shift;
  return _mm512_mul_ps(_mm512_cvtepu32_ps(_mm512_and_si512(d[pc.word], _mm512_set1_epi32(static_cast<int>(mask)))),
                       _mm512_set1_ps(Pow2(pc.low - pc.shift)));  // exact: the code's bits times a power of two
}

template <int BITS, int C>
QC_AVX512_INLINE void DecodeCode(const __m512i* d, __m512 s, __m512 z, float* dst) {
  // pieces of code C: P = C, except 3-bit codes 30 (pieces 30, 31) and 31 (pieces 32, 33)
  __m512 q;
  if constexpr (BITS == 3 && C >= 30) {
    constexpr int P = C == 30 ? 30 : 32;
    q = _mm512_add_ps(PieceValue<BITS, P>(d), PieceValue<BITS, P + 1>(d));
  } else {
    q = PieceValue<BITS, C>(d);
  }
  _mm512_storeu_ps(dst + C * kPackRows, _mm512_mul_ps(s, _mm512_sub_ps(q, z)));
}

template <int BITS, size_t... Cs>
QC_AVX512_INLINE void DecodeCodes(const __m512i* d, __m512 s0, __m512 z0, __m512 s1, __m512 z1, float* dst,
                                  std::index_sequence<Cs...>) {
  (DecodeCode<BITS, static_cast<int>(Cs)>(d, Cs < 16 ? s0 : s1, Cs < 16 ? z0 : z1, dst), ...);
}

template <int BITS, bool HALF, bool CODED>
QC_AVX512 void DecodeBlock(const PackedWeights& w, int64_t blk, int64_t c0, int64_t c1, float* wt) {
  const uint32_t* codes = w.codes.data() + blk * w.chunks * BITS * kPackRows;
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  __m512 s0 = _mm512_setzero_ps(), z0 = s0, s1 = s0, z1 = s0;
  for (int64_t c = c0; c < c1; ++c) {
    if (HALF) {
      GroupStats<CODED>(w, blk, 2 * c, s0, z0);
      if (2 * c + 1 < w.G) {
        GroupStats<CODED>(w, blk, 2 * c + 1, s1, z1);
      } else {  // columns past K (their x is zero)
        s1 = s0;
        z1 = z0;
      }
    } else if (c == c0 || c % chunks_per_group == 0) {
      GroupStats<CODED>(w, blk, c / chunks_per_group, s0, z0);
      s1 = s0;
      z1 = z0;
    }
    __m512i d[BITS];
    for (int i = 0; i < BITS; ++i) d[i] = _mm512_loadu_si512(codes + (c * BITS + i) * kPackRows);
    DecodeCodes<BITS>(d, s0, z0, s1, z1, wt + (c - c0) * spqr::kChunk * kPackRows,
                      std::make_index_sequence<spqr::kChunk>{});
  }
}

template <int BITS>
PackedDecodeFn DecodeFor(bool half, bool coded) {
  if (half) return coded ? &DecodeBlock<BITS, true, true> : &DecodeBlock<BITS, true, false>;
  return coded ? &DecodeBlock<BITS, false, true> : &DecodeBlock<BITS, false, false>;
}

template <int MR>
QC_AVX512 void Micro(const float* x, int64_t xstride, const float* wt, int64_t kc, float* c) {
  __m512 acc[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_loadu_ps(c + i * kPackRows);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 wv = _mm512_loadu_ps(wt + k * kPackRows);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * xstride + k]), wv, acc[i]);
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * kPackRows, acc[i]);
}

constexpr PackedMicroFn kMicroFns[kGemmRowsMax + 1] = {nullptr,    &Micro<1>,  &Micro<2>, &Micro<3>, &Micro<4>,
                                                        &Micro<5>,  &Micro<6>,  &Micro<7>, &Micro<8>, &Micro<9>,
                                                        &Micro<10>, &Micro<11>, &Micro<12>};

template <bool HALF, bool CODED>
constexpr PackedGemvFn kInt8Fns[kPackedMaxRows + 1] = {
    nullptr,
    &GemvInt8<1, HALF, CODED>,
    &GemvInt8<2, HALF, CODED>,
    &GemvInt8<3, HALF, CODED>,
    &GemvInt8<4, HALF, CODED>,
    &GemvInt8<5, HALF, CODED>,
    &GemvInt8<6, HALF, CODED>,
    &GemvInt8<7, HALF, CODED>,
    &GemvInt8<8, HALF, CODED>};

template <int BITS, bool HALF, bool CODED>
constexpr PackedGemvFn kFns[kPackedMaxRows + 1] = {nullptr,
                                  &Gemv<BITS, 1, HALF, CODED>,
                                  &Gemv<BITS, 2, HALF, CODED>,
                                  &Gemv<BITS, 3, HALF, CODED>,
                                  &Gemv<BITS, 4, HALF, CODED>,
                                  &Gemv<BITS, 5, HALF, CODED>,
                                  &Gemv<BITS, 6, HALF, CODED>,
                                  &Gemv<BITS, 7, HALF, CODED>,
                                  &Gemv<BITS, 8, HALF, CODED>};

template <int BITS>
PackedGemvFn FnFor(bool half, bool coded, int64_t M) {
  if (half) return coded ? kFns<BITS, true, true>[M] : kFns<BITS, true, false>[M];
  return coded ? kFns<BITS, false, true>[M] : kFns<BITS, false, false>[M];
}

bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace

PackedDecodeFn PackedDecodeAvx512(const PackedWeights& w) {
  if (!CpuHasAvx512() || w.codes.empty()) return nullptr;
  const bool half = w.group_size == 16;
  if (!half && w.group_size % spqr::kChunk != 0) return nullptr;
  switch (w.bits) {
    case 2: return DecodeFor<2>(half, w.coded_stats);
    case 3: return DecodeFor<3>(half, w.coded_stats);
    case 4: return DecodeFor<4>(half, w.coded_stats);
    default: return nullptr;
  }
}

PackedMicroFn PackedMicroAvx512(int mr) {
  return CpuHasAvx512() && mr >= 1 && mr <= kGemmRowsMax ? kMicroFns[mr] : nullptr;
}

PackedGemvFn PackedGemvAvx512(const PackedWeights& w, int64_t M) {
  if (CpuHasAvx512() && w.bits == 8) return PackedGemvAvx2(w, M);  // 8-bit codes: the AVX2 kernel
  if (!CpuHasAvx512() || M < 1 || M > kPackedMaxRows) return nullptr;
  const bool half = w.group_size == 16;
  if (!half && w.group_size % spqr::kChunk != 0) return nullptr;
  switch (w.bits) {
    case 2: return FnFor<2>(half, w.coded_stats, M);
    case 3: return FnFor<3>(half, w.coded_stats, M);
    case 4: return FnFor<4>(half, w.coded_stats, M);
    default: return nullptr;
  }
}

QC_AVX512 void HalvesToFloats(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

HalvesToFloatsFn HalvesToFloatsAvx512() { return CpuHasAvx512() ? &HalvesToFloats : nullptr; }

// PackedGemvInt8Inputs with AVX-512, SPAN columns per scale (16 or 32): per span the max of |x| (exact in any
// order), scale max/127, q = round-half-even(x · 127/max) clamped to ±127 (vrndscaleps in the default rounding mode,
// what nearbyint does), the 32 codes of a chunk stored as its 8 words. Identical values to the portable function.
template <int SPAN>
QC_AVX512 void Int8InputsAvx512(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq,
                                float* xd, float* xg, int64_t xg_stride) {
  constexpr int H = spqr::kChunk / SPAN, V = SPAN / 16;  // spans per chunk, vectors per span
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t m = 0; m < mm; ++m) {
    const float* xr = x + m * xstride;  // zero past K up to whole chunks
    for (int64_t c = 0; c < w.chunks; ++c) {
      alignas(16) int8_t q[spqr::kChunk];
      for (int h = 0; h < H; ++h) {
        __m512 v[V];
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < V; ++i) {
          v[i] = _mm512_loadu_ps(xr + c * spqr::kChunk + h * SPAN + 16 * i);
          amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        const float a = _mm512_reduce_max_ps(amax);
        const float inv = a > 0.f ? 127.f / a : 0.f;
        xd[(c * H + h) * mm + m] = a / 127.f;
        for (int i = 0; i < V; ++i) {
          const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m512i k = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
          _mm_store_si128(reinterpret_cast<__m128i*>(q + h * SPAN + 16 * i), _mm512_cvtepi32_epi8(k));
        }
      }
      for (int j = 0; j < 8; ++j) {
        int32_t word;
        std::memcpy(&word, q + 4 * j, 4);  // little-endian: column 4j + b in byte b
        xq[(c * 8 + j) * mm + m] = word;
      }
    }
    PackedGroupSums(w, xr, xg + m * xg_stride);
  }
}

QC_AVX512 void Int8InputsAvx512Any(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq,
                                   float* xd, float* xg, int64_t xg_stride) {
  if (XScalesPerChunk(w) == 2) {
    Int8InputsAvx512<16>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  } else {
    Int8InputsAvx512<32>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  }
}

PackedInt8InputsFn PackedInt8InputsAvx512() { return CpuHasAvx512() ? &Int8InputsAvx512Any : nullptr; }

bool PackedAvx512Available() { return CpuHasAvx512(); }

bool PackedInt8Available() {
  static const bool has = CpuHasAvx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}

PackedGemvFn PackedGemvVnni(const PackedWeights& w, int64_t M) {
  if (PackedInt8Available() && !w.bytes.empty()) return PackedGemvInt8Avx2(w, M);  // 8-bit codes: the AVX2 kernel
  if (!PackedInt8Available() || w.nibbles.empty() || M < 1 || M > kPackedMaxRows) return nullptr;
  const bool half = w.group_size == 16;
  if (!half && w.group_size % spqr::kChunk != 0) return nullptr;
  if (M == 1 && w.coded_stats) return half ? &GemvInt8Pair<true> : &GemvInt8Pair<false>;
  if (half) return w.coded_stats ? kInt8Fns<true, true>[M] : kInt8Fns<true, false>[M];
  return w.coded_stats ? kInt8Fns<false, true>[M] : kInt8Fns<false, false>[M];
}

#else  // not x86-64 GCC/Clang

PackedGemvFn PackedGemvAvx512(const PackedWeights&, int64_t) { return nullptr; }
bool PackedAvx512Available() { return false; }
PackedDecodeFn PackedDecodeAvx512(const PackedWeights&) { return nullptr; }
PackedMicroFn PackedMicroAvx512(int) { return nullptr; }
HalvesToFloatsFn HalvesToFloatsAvx512() { return nullptr; }
PackedInt8InputsFn PackedInt8InputsAvx512() { return nullptr; }
bool PackedInt8Available() { return false; }
PackedGemvFn PackedGemvVnni(const PackedWeights&, int64_t) { return nullptr; }

#endif

// The AVX-512 table (cpu_kernels.h): the packed GEMV for up to kPackedMaxRows rows of X per slice at any M (int8
// activations with AVX512-VNNI), the packed prefill GEMM, the row kernel on the stored layout (gemv_avx512.cc);
// empty without AVX-512 (F, BW, VL, DQ).
const CpuKernels& Avx512Kernels() {
  static const CpuKernels k = [] {
    CpuKernels t;
    t.name = "avx512";
    if (!PackedAvx512Available()) return t;
    t.packed_max_rows = kPackedMaxRows;
    t.packed_gemv = &PackedGemvAvx512;
    t.packed_gemv_int8 = PackedInt8Available() ? &PackedGemvVnni : nullptr;
    // 8-bit codes: AVX2's kernels (packed_avx2.cc: vpmaddwd on int8 X, conversions on fp32 X), slices of at most
    // kPackedCodes8MaxRows rows; no AVX-512 kernel of their own yet
    t.int8_codes8 = PackedAvx2Available();
    t.fp32_codes8 = PackedAvx2Available();
    t.packed_int8_inputs = PackedInt8InputsAvx512();
    t.packed_gemv_any_rows = true;
    t.packed_decode = &PackedDecodeAvx512;
    t.packed_micro = &PackedMicroAvx512;
    t.outlier_rows = PackedOutlierRowsF16c();
    t.halves_to_floats = HalvesToFloatsAvx512();
    t.gemv_row = &GemvRowAvx512;
    return t;
  }();
  return k;
}

}  // namespace Cpu
}  // namespace qcompiler
