// AVX2 GEMV on the pre-packed weights (layout in packed.h), for x86-64 CPUs without AVX-512: each block of 16 rows
// is taken as two halves of 8 rows (one 256-bit register of fp32 lanes), the same arithmetic as packed_avx512.cc's
// fp32 kernel: per 8 weights one AND, one conversion and one FMA per row of X, per group y += s * (t - z * sum x).
// AVX2 has no unsigned conversion, so a field that reaches bit 31 is shifted down one bit first (its power-of-two
// factor doubled): still exact. Up to 4 rows of X per call (16 registers); more take the portable paths.
#include "cpu/cpu_kernels.h"
#include "cpu/packed.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QC_HAVE_AVX2_BUILD 1
#define QC_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QC_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#endif

namespace qcompiler {
namespace Cpu {

#if defined(QC_HAVE_AVX2_BUILD)
namespace {

constexpr int kHalf = kPackRows / 2;  // rows per 256-bit register
constexpr int64_t kPrefetchChunks = 8;

template <int MM>
constexpr int kChains2 = MM == 1 ? 4 : MM == 2 ? 2 : 1;

template <int MM, bool HALF>
struct Acc2 {
  __m256 v[HALF ? 2 : 1][MM][kChains2<MM>];
};

template <int BITS, int MM, bool HALF, int P>
QC_AVX2_INLINE void OnePiece2(const __m256i* d, const float* xs, Acc2<MM, HALF>& acc) {
  constexpr Piece pc = PieceOf(BITS, P);
  constexpr bool top = pc.shift + pc.width == 32;  // the field includes bit 31: shift it down first
  constexpr uint32_t mask = ((1u << pc.width) - 1u) << (top ? pc.shift - 1 : pc.shift);
  constexpr int h = HALF && pc.code >= 16 ? 1 : 0;
  constexpr int chain = P % kChains2<MM>;
  const __m256i word = top ? _mm256_srli_epi32(d[pc.word], 1) : d[pc.word];
  __m256 v = _mm256_cvtepi32_ps(_mm256_and_si256(word, _mm256_set1_epi32(static_cast<int>(mask))));
  if (top) v = _mm256_add_ps(v, v);  // exact: back to the field's place value, which xs's factor expects
#pragma GCC unroll 4
  for (int m = 0; m < MM; ++m) {
    acc.v[h][m][chain] = _mm256_fmadd_ps(v, _mm256_set1_ps(xs[P * MM + m]), acc.v[h][m][chain]);
  }
}

template <int BITS, int MM, bool HALF, size_t... Ps>
QC_AVX2_INLINE void AllPieces2(const __m256i* d, const float* xs, Acc2<MM, HALF>& acc, std::index_sequence<Ps...>) {
  (OnePiece2<BITS, MM, HALF, static_cast<int>(Ps)>(d, xs, acc), ...);
}

// y[m] += s * (t[m] - z * xg[m][g]) for lanes [8 L, 8 L + 8) of block blk, group g.
template <int MM, bool CODED>
QC_AVX2_INLINE void FinishGroup2(const PackedGemvArgs& a, int64_t blk, int64_t g, int L, const __m256* t,
                                 __m256* y) {
  const PackedWeights& w = *a.w;
  __m256 s, z;
  if (CODED) {
    const __m128i bytes = _mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(w.stat_codes.data() + (blk * w.G + g) * kPackRows + L * kHalf));
    const __m256i c = _mm256_cvtepu8_epi32(bytes);
    const float* v = CodedStatValues(w, blk, g);
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15)));
    const __m256 zc = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
    s = _mm256_mul_ps(_mm256_set1_ps(v[0]), _mm256_sub_ps(sc, _mm256_set1_ps(v[1])));
    z = _mm256_mul_ps(_mm256_set1_ps(v[2]), _mm256_sub_ps(zc, _mm256_set1_ps(v[3])));
  } else if (w.half_stats) {
    const uint16_t* v = w.stat_halves.data() + (blk * w.G + g) * 2 * kPackRows + L * kHalf;
    s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + kPackRows)));
  } else {
    const float* v = w.stat_values.data() + (blk * w.G + g) * 2 * kPackRows + L * kHalf;
    s = _mm256_loadu_ps(v);
    z = _mm256_loadu_ps(v + kPackRows);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MM; ++m) {
    const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xg[m * a.xg_stride + g]), t[m]);
    y[m] = _mm256_fmadd_ps(s, d, y[m]);
  }
}

template <int MM, bool HALF>
QC_AVX2_INLINE void SumChains2(const Acc2<MM, HALF>& acc, int h, __m256* t) {
#pragma GCC unroll 4
  for (int m = 0; m < MM; ++m) {
    __m256 v = acc.v[h][m][0];
    for (int i = 1; i < kChains2<MM>; ++i) v = _mm256_add_ps(v, acc.v[h][m][i]);
    t[m] = v;
  }
}

template <int BITS, int MM, bool HALF, bool CODED>
QC_AVX2 void Gemv2(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int P = PiecesPerChunk(BITS);
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* codes = w.codes.data() + blk * w.chunks * BITS * kPackRows;
    for (int L = 0; L < 2; ++L) {  // the block's two halves of 8 rows
      __m256 y[MM];
      for (int m = 0; m < MM; ++m) y[m] = _mm256_setzero_ps();
      for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += HALF ? 2 : 1) {
        Acc2<MM, HALF> acc;
        for (auto& half : acc.v)
          for (auto& row : half)
            for (auto& v : row) v = _mm256_setzero_ps();
        for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
          __m256i d[BITS];
          for (int i = 0; i < BITS; ++i) {
            const uint32_t* p = codes + (c * BITS + i) * kPackRows + L * kHalf;
            _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchChunks * BITS * kPackRows), _MM_HINT_T0);
            d[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          }
          AllPieces2<BITS, MM, HALF>(d, a.xs + c * P * MM, acc, std::make_index_sequence<P>{});
        }
        __m256 t[MM];
        SumChains2<MM, HALF>(acc, 0, t);
        FinishGroup2<MM, CODED>(a, blk, g, L, t, y);
        if (HALF && g + 1 < w.G) {
          SumChains2<MM, HALF>(acc, 1, t);
          FinishGroup2<MM, CODED>(a, blk, g + 1, L, t, y);
        }
      }
      for (int m = 0; m < MM; ++m) {
        _mm256_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows + L * kHalf, y[m]);
      }
    }
  }
}

template <int BITS, bool HALF, bool CODED>
constexpr PackedGemvFn kFns2[kPackedAvx2MaxRows + 1] = {nullptr, &Gemv2<BITS, 1, HALF, CODED>,
                                                         &Gemv2<BITS, 2, HALF, CODED>, &Gemv2<BITS, 3, HALF, CODED>,
                                                         &Gemv2<BITS, 4, HALF, CODED>};

template <int BITS>
PackedGemvFn FnFor2(bool half, bool coded, int64_t M) {
  if (half) return coded ? kFns2<BITS, true, true>[M] : kFns2<BITS, true, false>[M];
  return coded ? kFns2<BITS, false, true>[M] : kFns2<BITS, false, false>[M];
}

// Quads 2i and 2i + 1 of a chunk's codes for 8 rows (the 4 codes of columns 4q..4q+3 as bytes per lane), p: the
// chunk's first word for these rows. Nibbles: word i's low and high nibbles. codes3 (packed.h): words 0..2 hold
// quads 0..5 in their low six bits; quads 6 and 7 join word 0's or word 2's top two bits with a bit of word 1.
QC_AVX2_INLINE __m256i LoadWord2(const uint32_t* p, int k) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * kPackRows));
}

template <bool CODES3>
QC_AVX2_INLINE void QuadPair2(const uint32_t* p, int i, __m256i& lo, __m256i& hi) {
  if (!CODES3) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i z = LoadWord2(p, i);
    lo = _mm256_and_si256(z, low4);
    hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
  } else if (i < 3) {
    const __m256i low3 = _mm256_set1_epi8(7);
    const __m256i z = LoadWord2(p, i);
    lo = _mm256_and_si256(z, low3);
    hi = _mm256_and_si256(_mm256_srli_epi16(z, 3), low3);
  } else {
    const __m256i two = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    const __m256i w0 = LoadWord2(p, 0), w1 = LoadWord2(p, 1), w2 = LoadWord2(p, 2);
    lo = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w0, 6), two), _mm256_and_si256(_mm256_srli_epi16(w1, 4), bit2));
    hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w2, 6), two), _mm256_and_si256(_mm256_srli_epi16(w1, 5), bit2));
  }
}

// int8 path without VNNI (accuracy_level 4 on AVX2 CPUs): the nibble layout and the int8 X of packed_avx512.cc's
// GemvInt8. Per word (4 codes of 8 rows) vpmaddubsw multiplies the codes (unsigned, ≤ 15) with 4 int8 x (|x| ≤ 127)
// into int16 pairs; a chunk's 8 products per lane are summed in int16 (at most 8 · 2 · 15 · 127 = 30480 < 2^15: no
// saturation) and widened once by vpmaddwd, then converted and scaled by the chunk's X scale as there.
template <int MM, bool HALF, bool CODED, bool CODES3>
QC_AVX2 void GemvInt82(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;
  constexpr int W = CODES3 ? 3 : 4;  // words per chunk and lane
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* nib = (CODES3 ? w.codes3.data() : w.nibbles.data()) + blk * w.chunks * W * kPackRows;
    for (int L = 0; L < 2; ++L) {  // the block's two halves of 8 rows
      __m256 y[MM];
      for (int m = 0; m < MM; ++m) y[m] = _mm256_setzero_ps();
      for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
        __m256 t[H][MM];
        for (int h = 0; h < H; ++h)
          for (int m = 0; m < MM; ++m) t[h][m] = _mm256_setzero_ps();
        for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
          __m256i acc[H][MM];
          for (int h = 0; h < H; ++h)
            for (int m = 0; m < MM; ++m) acc[h][m] = _mm256_setzero_si256();
          const int32_t* xq = a.xq + c * 8 * MM;
          const uint32_t* p = nib + c * W * kPackRows + L * kHalf;
          for (int i = 0; i < W; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(p + (kPrefetchChunks * W + i) * kPackRows), _MM_HINT_T0);
          }
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            __m256i lo, hi;
            QuadPair2<CODES3>(p, i, lo, hi);
            const int h = HALF && i >= 2 ? 1 : 0;
#pragma GCC unroll 4
            for (int m = 0; m < MM; ++m) {
              const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xq[(2 * i) * MM + m]));
              const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xq[(2 * i + 1) * MM + m]));
              acc[h][m] = _mm256_add_epi16(acc[h][m], _mm256_add_epi16(plo, phi));
            }
          }
          for (int h = 0; h < H; ++h) {
#pragma GCC unroll 4
            for (int m = 0; m < MM; ++m) {
              const __m256 v = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[h][m], ones));
              t[h][m] = _mm256_fmadd_ps(v, _mm256_set1_ps(a.xd[(c * H + h) * MM + m]), t[h][m]);
            }
          }
        }
        FinishGroup2<MM, CODED>(a, blk, g, L, t[0], y);
        if (HALF && g + 1 < w.G) FinishGroup2<MM, CODED>(a, blk, g + 1, L, t[H - 1], y);
      }
      for (int m = 0; m < MM; ++m) {
        _mm256_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows + L * kHalf, y[m]);
      }
    }
  }
}

// s and z of one group for the block's two halves, then y[L] += s * (t[L] - z * xg) as FinishGroup2. Coded
// statistics of at most 3 bits: the 8 values a code can take, v0 (i - v1) and v2 (i - v3) for i = 0..7 (FinishGroup2's
// expressions on the same numbers, so the same values), built once for both halves, and a vpermps by the codes
// (a 3-bit code indexes an 8-lane register; vpermps reads the low 3 bits, so the zero code in bits 4..6 of a scale
// index does not disturb it).
template <bool CODED>
QC_AVX2_INLINE void GroupStatsBlock2(const PackedWeights& w, int64_t blk, int64_t g, __m256* s, __m256* z) {
  if (CODED) {
    const float* v = CodedStatValues(w, blk, g);
    const __m256 iota = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
    const __m256 st = _mm256_mul_ps(_mm256_set1_ps(v[0]), _mm256_sub_ps(iota, _mm256_set1_ps(v[1])));
    const __m256 zt = _mm256_mul_ps(_mm256_set1_ps(v[2]), _mm256_sub_ps(iota, _mm256_set1_ps(v[3])));
    const uint8_t* codes = w.stat_codes.data() + (blk * w.G + g) * kPackRows;
    for (int L = 0; L < 2; ++L) {
      const __m256i c =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + L * kHalf)));
      s[L] = _mm256_permutevar8x32_ps(st, c);
      z[L] = _mm256_permutevar8x32_ps(zt, _mm256_srli_epi32(c, 4));
    }
  } else if (w.half_stats) {
    const uint16_t* v = w.stat_halves.data() + (blk * w.G + g) * 2 * kPackRows;
    for (int L = 0; L < 2; ++L) {
      s[L] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + L * kHalf)));
      z[L] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + kPackRows + L * kHalf)));
    }
  } else {
    const float* v = w.stat_values.data() + (blk * w.G + g) * 2 * kPackRows;
    for (int L = 0; L < 2; ++L) {
      s[L] = _mm256_loadu_ps(v + L * kHalf);
      z[L] = _mm256_loadu_ps(v + kPackRows + L * kHalf);
    }
  }
}

template <bool CODED>
QC_AVX2_INLINE void FinishGroupBlock2(const PackedGemvArgs& a, int64_t blk, int64_t g, const __m256* t, __m256* y) {
  __m256 s[2], z[2];
  GroupStatsBlock2<CODED>(*a.w, blk, g, s, z);
  const __m256 xg = _mm256_set1_ps(a.xg[g]);
  for (int L = 0; L < 2; ++L) y[L] = _mm256_fmadd_ps(s[L], _mm256_fnmadd_ps(z[L], xg, t[L]), y[L]);
}

// GemvInt82 at M = 1, a whole block (both halves of 8 rows) per pass: the halves share each x word's broadcast, the
// chunk scales and group sums, and the statistics tables (FinishGroupBlock2); the codes are prefetched a fixed
// distance ahead in the block's stream and on into the next block's. Coded statistics of at most 3 bits, fp16 or
// fp32 statistics. The same operations on the same values as GemvInt82<1, HALF, CODED> (exact integer sums, then the
// same fp32 steps in the same order), so the same results.
template <bool HALF, bool CODED, bool CODES3>
QC_AVX2 void GemvInt8Block2(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;
  constexpr int W = CODES3 ? 3 : 4;  // words (cache lines of the block) per chunk
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const int64_t block_words = w.chunks * W * kPackRows;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* nib = (CODES3 ? w.codes3.data() : w.nibbles.data()) + blk * block_words;
    __m256 y[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
      __m256 t[H][2];
      for (auto& th : t)
        for (auto& v : th) v = _mm256_setzero_ps();
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        __m256i acc[H][2];
        for (auto& ah : acc)
          for (auto& v : ah) v = _mm256_setzero_si256();
        const int32_t* xq = a.xq + c * 8;
        // the chunk kPrefetchChunks ahead (W lines), past the block's end in the next block (prefetches never fault)
        const uint32_t* ahead = nib + (c + kPrefetchChunks) * W * kPackRows;
        for (int i = 0; i < W; ++i) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * kPackRows), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256i xl = _mm256_set1_epi32(xq[2 * i]), xh = _mm256_set1_epi32(xq[2 * i + 1]);
          const int h = HALF && i >= 2 ? 1 : 0;
          for (int L = 0; L < 2; ++L) {
            __m256i lo, hi;
            QuadPair2<CODES3>(nib + c * W * kPackRows + L * kHalf, i, lo, hi);
            acc[h][L] = _mm256_add_epi16(acc[h][L],
                                         _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
          }
        }
        for (int h = 0; h < H; ++h) {
          const __m256 xd = _mm256_set1_ps(a.xd[c * H + h]);
          for (int L = 0; L < 2; ++L) {
            t[h][L] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[h][L], ones)), xd, t[h][L]);
          }
        }
      }
      FinishGroupBlock2<CODED>(a, blk, g, t[0], y);
      if (HALF && g + 1 < w.G) FinishGroupBlock2<CODED>(a, blk, g + 1, t[H - 1], y);
    }
    _mm256_storeu_ps(a.y + (blk - b0) * kPackRows, y[0]);
    _mm256_storeu_ps(a.y + (blk - b0) * kPackRows + kHalf, y[1]);
  }
}

// GemvInt8Block2 for MM = 2..4 rows of X (prefill slices): the two halves decode their codes once per chunk and
// every row's x broadcast serves both; the integer sums stay in registers (2 halves × MM rows), the fp32 sums (t)
// and y live in small arrays (AVX2's 16 registers hold no more). Same values as GemvInt82<MM, HALF, CODED, CODES3>.
template <int MM, bool HALF, bool CODED, bool CODES3>
QC_AVX2 void GemvInt8BlockRows2(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;          // groups per chunk
  constexpr int WH = 4 / H;                // words per group phase of a chunk
  constexpr int W = CODES3 ? 3 : 4;        // words per chunk and lane
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const int64_t block_words = w.chunks * W * kPackRows;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* nib = (CODES3 ? w.codes3.data() : w.nibbles.data()) + blk * block_words;
    __m256 y[2][MM];
    for (auto& yl : y)
      for (auto& v : yl) v = _mm256_setzero_ps();
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
      __m256 t[H][2][MM];
      for (auto& th : t)
        for (auto& tl : th)
          for (auto& v : tl) v = _mm256_setzero_ps();
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        const int32_t* xq = a.xq + c * 8 * MM;
        const uint32_t* ahead = nib + (c + kPrefetchChunks) * W * kPackRows;
        for (int i = 0; i < W; ++i) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * kPackRows), _MM_HINT_T0);
        for (int h = 0; h < H; ++h) {
          __m256i acc[2][MM];
          for (auto& al : acc)
            for (auto& v : al) v = _mm256_setzero_si256();
#pragma GCC unroll 4
          for (int i = h * WH; i < (h + 1) * WH; ++i) {
            __m256i lo[2], hi[2];
            for (int L = 0; L < 2; ++L) QuadPair2<CODES3>(nib + c * W * kPackRows + L * kHalf, i, lo[L], hi[L]);
#pragma GCC unroll 4
            for (int m = 0; m < MM; ++m) {
              const __m256i xl = _mm256_set1_epi32(xq[(2 * i) * MM + m]), xh = _mm256_set1_epi32(xq[(2 * i + 1) * MM + m]);
              for (int L = 0; L < 2; ++L) {
                acc[L][m] = _mm256_add_epi16(
                    acc[L][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo[L], xl), _mm256_maddubs_epi16(hi[L], xh)));
              }
            }
          }
#pragma GCC unroll 4
          for (int m = 0; m < MM; ++m) {
            const __m256 xd = _mm256_set1_ps(a.xd[(c * H + h) * MM + m]);
            for (int L = 0; L < 2; ++L) {
              t[h][L][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[L][m], ones)), xd, t[h][L][m]);
            }
          }
        }
      }
      for (int h = 0; h < H && g + h < w.G; ++h) {
        __m256 s[2], z[2];
        GroupStatsBlock2<CODED>(w, blk, g + h, s, z);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m) {
          const __m256 xg = _mm256_set1_ps(a.xg[m * a.xg_stride + g + h]);
          for (int L = 0; L < 2; ++L) y[L][m] = _mm256_fmadd_ps(s[L], _mm256_fnmadd_ps(z[L], xg, t[h][L][m]), y[L][m]);
        }
      }
    }
    for (int m = 0; m < MM; ++m) {
      for (int L = 0; L < 2; ++L) _mm256_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows + L * kHalf, y[L][m]);
    }
  }
}

// int8 path for 8-bit codes (PackedWeights::bytes: word i of a lane = the codes of columns 4i..4i+3, one byte each).
// vpmaddubsw would saturate (2 · 255 · 127 > 2^15), so the codes are widened instead: the word's codes 0 and 2 (AND
// 0x00FF00FF) and 1 and 3 (a 16-bit shift right by 8) as int16 pairs, each multiplied by the matching pair of int8
// x sign-extended to int16 (prepared once per call: xe = (x0, x2), xo = (x1, x3) of each quad) and summed into int32
// by vpmaddwd: exact, no saturation (a chunk's sum per lane is at most 32 · 255 · 127). A whole block (both halves of
// 8 rows) per pass, MM rows of X; the fp32 steps per chunk and group are GemvInt82's (FinishGroup2).
template <int MM, bool HALF, bool CODED>
QC_AVX2 void GemvBytes2(const PackedGemvArgs& a, int64_t b0, int64_t b1) {
  const PackedWeights& w = *a.w;
  constexpr int H = HALF ? 2 : 1;
  constexpr int W = 8;  // words per chunk and lane
  const int64_t chunks_per_group = HALF ? 1 : w.group_size / spqr::kChunk;
  const int64_t block_words = w.chunks * W * kPackRows;
  // x as int16 pairs: pairs[2 j] = (x0, x2), pairs[2 j + 1] = (x1, x3) of word j of xq ([chunks][8][MM])
  thread_local std::vector<int32_t> pairs;
  const size_t words = static_cast<size_t>(w.chunks * 8 * MM);
  if (pairs.size() < 2 * words) pairs.resize(2 * words);
  for (size_t j = 0; j < words; ++j) {
    const uint32_t v = static_cast<uint32_t>(a.xq[j]);
    const auto half = [v](int b) { return static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(static_cast<int8_t>(v >> (8 * b))))); };
    pairs[2 * j] = static_cast<int32_t>(half(0) | half(2) << 16);
    pairs[2 * j + 1] = static_cast<int32_t>(half(1) | half(3) << 16);
  }
  const __m256i even = _mm256_set1_epi32(0x00FF00FF);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint32_t* q = w.bytes.data() + blk * block_words;
    __m256 y[2][MM] = {};  // zeros
    for (int64_t c0 = 0, g = 0; c0 < w.chunks; c0 += chunks_per_group, g += H) {
      __m256 t[H][2][MM] = {};
      for (int64_t c = c0, c1 = std::min(w.chunks, c0 + chunks_per_group); c < c1; ++c) {
        __m256i acc[H][2][MM] = {};
        // the chunk kPrefetchChunks ahead (W lines), past the block's end in the next block (prefetches never fault)
        const uint32_t* ahead = q + (c + kPrefetchChunks) * W * kPackRows;
        for (int i = 0; i < W; ++i) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * kPackRows), _MM_HINT_T0);
        const int32_t* xp = pairs.data() + c * 8 * MM * 2;
#pragma GCC unroll 8
        for (int i = 0; i < W; ++i) {
          const int h = HALF && i >= 4 ? 1 : 0;
          __m256i lo[2], hi[2];
          for (int L = 0; L < 2; ++L) {
            const __m256i z = LoadWord2(q + c * W * kPackRows + L * kHalf, i);
            lo[L] = _mm256_and_si256(z, even);
            hi[L] = _mm256_srli_epi16(z, 8);
          }
#pragma GCC unroll 4
          for (int m = 0; m < MM; ++m) {
            const __m256i xe = _mm256_set1_epi32(xp[(i * MM + m) * 2]), xo = _mm256_set1_epi32(xp[(i * MM + m) * 2 + 1]);
            for (int L = 0; L < 2; ++L) {
              acc[h][L][m] = _mm256_add_epi32(
                  acc[h][L][m], _mm256_add_epi32(_mm256_madd_epi16(lo[L], xe), _mm256_madd_epi16(hi[L], xo)));
            }
          }
        }
        for (int h = 0; h < H; ++h) {
#pragma GCC unroll 4
          for (int m = 0; m < MM; ++m) {
            const __m256 xd = _mm256_set1_ps(a.xd[(c * H + h) * MM + m]);
            for (int L = 0; L < 2; ++L) {
              t[h][L][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][L][m]), xd, t[h][L][m]);
            }
          }
        }
      }
      for (int L = 0; L < 2; ++L) {
        FinishGroup2<MM, CODED>(a, blk, g, L, t[0][L], y[L]);
        if (HALF && g + 1 < w.G) FinishGroup2<MM, CODED>(a, blk, g + 1, L, t[H - 1][L], y[L]);
      }
    }
    for (int m = 0; m < MM; ++m) {
      for (int L = 0; L < 2; ++L) _mm256_storeu_ps(a.y + m * a.y_stride + (blk - b0) * kPackRows + L * kHalf, y[L][m]);
    }
  }
}

template <bool HALF, bool CODED>
constexpr PackedGemvFn kBytesFns2[kPackedCodes8MaxRows + 1] = {
    nullptr, &GemvBytes2<1, HALF, CODED>, &GemvBytes2<2, HALF, CODED>, &GemvBytes2<3, HALF, CODED>,
    &GemvBytes2<4, HALF, CODED>};

template <bool HALF, bool CODED, bool CODES3>
constexpr PackedGemvFn kInt8Fns2[kPackedAvx2MaxRows + 1] = {
    nullptr, &GemvInt82<1, HALF, CODED, CODES3>, &GemvInt82<2, HALF, CODED, CODES3>,
    &GemvInt82<3, HALF, CODED, CODES3>, &GemvInt82<4, HALF, CODED, CODES3>};

template <bool HALF, bool CODED, bool CODES3>
constexpr PackedGemvFn kInt8BlockFns2[kPackedAvx2MaxRows + 1] = {
    nullptr, &GemvInt8Block2<HALF, CODED, CODES3>, &GemvInt8BlockRows2<2, HALF, CODED, CODES3>,
    &GemvInt8BlockRows2<3, HALF, CODED, CODES3>, &GemvInt8BlockRows2<4, HALF, CODED, CODES3>};

template <bool CODES3>
PackedGemvFn Int8FnFor2(bool half, bool coded, int64_t M, int64_t stat_bits) {
  if (M == 1 && (!coded || stat_bits <= 3)) {  // a whole block per pass (4-bit statistic codes: 16 values)
    if (half) return coded ? &GemvInt8Block2<true, true, CODES3> : &GemvInt8Block2<true, false, CODES3>;
    return coded ? &GemvInt8Block2<false, true, CODES3> : &GemvInt8Block2<false, false, CODES3>;
  }
  if (!coded || stat_bits <= 3) {  // 2..4 rows: the same, both halves per pass
    if (half) return coded ? kInt8BlockFns2<true, true, CODES3>[M] : kInt8BlockFns2<true, false, CODES3>[M];
    return coded ? kInt8BlockFns2<false, true, CODES3>[M] : kInt8BlockFns2<false, false, CODES3>[M];
  }
  if (half) return coded ? kInt8Fns2<true, true, CODES3>[M] : kInt8Fns2<true, false, CODES3>[M];
  return coded ? kInt8Fns2<false, true, CODES3>[M] : kInt8Fns2<false, false, CODES3>[M];
}

// The outliers of rows [n0, n1) times x added to y[n - n0] (stride 1), branch-free over rows: the products in
// storage order summed into a running fp64 total (cum[i] = sum of the first i products of the range), then each
// row's sum is the difference of the totals at its two ends, rounded to fp32 once. Rows hold few outliers at uneven
// counts (SmolLM2's 4-bit export: 83 % of the rows none; the 3-bit one 0 to 20+), so a loop per row spent its time
// on mispredicted loop exits (2-3x slower in a replay of both exports' row pointers; the decode figures before and
// after are in bench/results/peers-*.md). fp64 keeps the difference of two totals as
// exact as the fp32 row sum it replaces (totals over one task's rows; the products are fp32). A NaN or infinity in
// x reaches every later row of the range (it already reaches every row through the dense part).
__attribute__((target("avx,fma,f16c"))) void OutlierRowsF16c(const uint16_t* val, const uint16_t* col,
                                                              const int32_t* row_ptr, const float* x, int64_t n0,
                                                              int64_t n1, float* y) {
  const int32_t q0 = row_ptr[n0], q1 = row_ptr[n1];
  if (q1 == q0) return;
  thread_local std::vector<double> cum;
  cum.resize(std::max(cum.size(), static_cast<size_t>(q1 - q0) + 1));
  double* c = cum.data() - q0;  // c[q] = sum of the products [q0, q)
  double total = 0.0;
  c[q0] = 0.0;
  int32_t q = q0;
  alignas(32) float v[8];
  for (; q + 8 <= q1; q += 8) {  // 8 values converted at once
    _mm256_store_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(val + q))));
    for (int i = 0; i < 8; ++i) {
      total += static_cast<double>(v[i] * x[col[q + i]]);
      c[q + i + 1] = total;
    }
  }
  for (; q < q1; ++q) {
    total += static_cast<double>(_cvtsh_ss(val[q]) * x[col[q]]);
    c[q + 1] = total;
  }
  for (int64_t n = n0; n < n1; ++n) y[n - n0] += static_cast<float>(c[row_ptr[n + 1]] - c[row_ptr[n]]);
}

// PackedGemvInt8Inputs with AVX2 (the portable loop's x86-64-v3 clone stayed scalar): per span of SPAN columns (16
// or 32) the max of |x| (exact in any order), then x · 127 / max rounded to nearest even (vroundps, as nearbyint),
// clamped to ±127 and packed to bytes; identical values.
template <int SPAN>
QC_AVX2 void Int8InputsAvx2(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq,
                            float* xd, float* xg, int64_t xg_stride) {
  constexpr int H = spqr::kChunk / SPAN, V = SPAN / 8;  // spans per chunk, vectors per span
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < mm; ++m) {
    const float* xr = x + m * xstride;  // zero past K up to whole chunks
    for (int64_t c = 0; c < w.chunks; ++c) {
      __m256i k[4];  // the chunk's 32 codes as int32, 8 per vector
      for (int h = 0; h < H; ++h) {
        __m256 v[V];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < V; ++i) {
          v[i] = _mm256_loadu_ps(xr + c * spqr::kChunk + h * SPAN + 8 * i);
          amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float a = _mm_cvtss_f32(m4);
        const float inv = a > 0.f ? 127.f / a : 0.f;
        xd[(c * H + h) * mm + m] = a / 127.f;
        for (int i = 0; i < V; ++i) {
          const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          k[h * V + i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
      }
      // int32 -> int8 (no saturation: |k| <= 127); the packs interleave 128-bit lanes, the permute restores column
      // order: word j = columns 4j..4j+3, one byte each
      const __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(k[0], k[1]), _mm256_packs_epi32(k[2], k[3])), order);
      if (mm == 1) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + c * 8), b);
      } else {
        alignas(32) int32_t words[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(words), b);
        for (int j = 0; j < 8; ++j) xq[(c * 8 + j) * mm + m] = words[j];
      }
    }
    PackedGroupSums(w, xr, xg + m * xg_stride);
  }
}

QC_AVX2 void Int8InputsAvx2Any(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq,
                               float* xd, float* xg, int64_t xg_stride) {
  if (XScalesPerChunk(w) == 2) {
    Int8InputsAvx2<16>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  } else {
    Int8InputsAvx2<32>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  }
}

}  // namespace

PackedOutlierRowsFn PackedOutlierRowsF16c() {
  static const bool has =
      __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has ? &OutlierRowsF16c : nullptr;
}

bool PackedAvx2Available() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

PackedGemvFn PackedGemvAvx2(const PackedWeights& w, int64_t M) {
  if (!PackedAvx2Available() || M < 1 || M > kPackedAvx2MaxRows || w.codes.empty()) return nullptr;
  const bool half = w.group_size == 16;
  if (!half && w.group_size % spqr::kChunk != 0) return nullptr;
  switch (w.bits) {
    case 2: return FnFor2<2>(half, w.coded_stats, M);
    case 3: return FnFor2<3>(half, w.coded_stats, M);
    case 4: return FnFor2<4>(half, w.coded_stats, M);
    case 8: return FnFor2<8>(half, w.coded_stats, M);
    default: return nullptr;
  }
}

PackedGemvFn PackedGemvInt8Avx2(const PackedWeights& w, int64_t M) {
  const bool codes3 = !w.codes3.empty(), bytes = !w.bytes.empty();
  if (!PackedAvx2Available() || M < 1 || M > kPackedAvx2MaxRows || (w.nibbles.empty() && !codes3 && !bytes)) {
    return nullptr;
  }
  const bool half = w.group_size == 16;
  if (!half && w.group_size % spqr::kChunk != 0) return nullptr;
  if (bytes) {
    if (M > kPackedCodes8MaxRows) return nullptr;
    if (half) return w.coded_stats ? kBytesFns2<true, true>[M] : kBytesFns2<true, false>[M];
    return w.coded_stats ? kBytesFns2<false, true>[M] : kBytesFns2<false, false>[M];
  }
  return codes3 ? Int8FnFor2<true>(half, w.coded_stats, M, w.stat_bits)
                : Int8FnFor2<false>(half, w.coded_stats, M, w.stat_bits);
}

#else  // not x86-64 GCC/Clang

PackedGemvFn PackedGemvInt8Avx2(const PackedWeights&, int64_t) { return nullptr; }
bool PackedAvx2Available() { return false; }
PackedOutlierRowsFn PackedOutlierRowsF16c() { return nullptr; }
PackedGemvFn PackedGemvAvx2(const PackedWeights&, int64_t) { return nullptr; }

#endif

// The AVX2 table (cpu_kernels.h): the packed GEMV (fp32 and int8 activations) for up to kPackedAvx2MaxRows rows of X
// per slice, at any M (prefill too, where the portable GEMM on the stored layout had run: bench/results/ab-2026-12-07-*),
// outliers per row with F16C; empty without AVX2 + FMA.
const CpuKernels& Avx2Kernels() {
  static const CpuKernels k = [] {
    CpuKernels t;
    t.name = "avx2";
    if (!PackedAvx2Available()) return t;
    t.packed_max_rows = kPackedAvx2MaxRows;
    t.packed_gemv = &PackedGemvAvx2;
    t.packed_gemv_int8 = &PackedGemvInt8Avx2;
    t.packed_gemv_any_rows = true;
    t.int8_codes3 = true;
    t.int8_codes8 = true;
    t.fp32_codes8 = true;
#if defined(QC_HAVE_AVX2_BUILD)
    t.packed_int8_inputs = &Int8InputsAvx2Any;  // x86-64 builds only (the other entries have stubs below)
#endif
    t.outlier_rows = PackedOutlierRowsF16c();
    return t;
  }();
  return k;
}

}  // namespace Cpu
}  // namespace qcompiler
