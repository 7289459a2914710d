// AVX-512 row kernel of the CPU GEMV path: 16 codes per vector, dequantized by a 16-entry lookup table per group.
//
// Per group g of a row, lut[i] = s_g * (i mod 2^bits - z_g) (2-bit: i mod 4, 3-bit: i mod 8), so one vpermps maps
// a vector of codes to weights exactly as the quantizer evaluates them (s * (q - z), two fp32 roundings). vpermps
// reads only the low 4 bits of each index lane, which lets the code extraction leave the neighbouring code's bits
// above the code (the table repeats itself), so per 16 weights it costs:
//   4-bit: vpmovzxbd (16 bytes -> 16 lanes; low nibbles = codes 0..15, >> 4 = codes 16..31)
//   2-bit: vpmovzxbd of the 8 plane bytes twice, one variable shift
//   3-bit: as 2-bit, plus the high-bit word rotated per lane to bit 2 and merged by one vpternlogd
// then vpermps + one FMA per row of X. Functions carry target attributes (no -m flags for the file), so nothing
// here is reached on CPUs without AVX-512.
#include "cpu/gemv_avx512.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QC_HAVE_AVX512_BUILD 1
#define QC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define QC_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), always_inline))
#endif

namespace qcompiler {
namespace Cpu {

#if defined(QC_HAVE_AVX512_BUILD)
namespace {

template <int BITS>
QC_AVX512 inline __m512i CodeVector(const uint8_t* chunk, int half) {
  if (BITS == 4) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
    return half ? _mm512_srli_epi32(b, 4) : b;
  }
  // Lane j of half h holds code 16h + j: plane byte j % 8 shifted by 2 * (2h + j / 8).
  __m128i plane = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(chunk));
  plane = _mm_unpacklo_epi64(plane, plane);
  const __m512i shift = half ? _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6)
                             : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i lo = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(plane), shift);
  if (BITS == 2) return lo;
  // The high bit of code c is bit c of the little-endian word at bytes 8..11: rotate it to bit 2.
  uint32_t word;
  std::memcpy(&word, chunk + 8, sizeof(word));
  const __m512i rot = half ? _mm512_setr_epi32(14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29)
                           : _mm512_setr_epi32(30, 31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13);
  const __m512i hi = _mm512_rorv_epi32(_mm512_set1_epi32(static_cast<int>(word)), rot);
  // bits 0-1 from lo, the rest (bit 2 = the high bit) from hi: bitwise select mask ? lo : hi
  return _mm512_ternarylogic_epi32(_mm512_set1_epi32(3), lo, hi, 0xCA);
}

template <int BITS, int MM>
QC_AVX512 void GemvRow(const GemvRowArgs& a, const uint8_t* qrow, int64_t g0, int64_t g1, const float* s,
                       const float* z, float* y) {
  const __m512 iota = BITS == 4   ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                      : BITS == 3 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7)
                                  : _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const int64_t per_group = a.group_size / 16;
  const int64_t n_vec = (a.K + 15) / 16;
  // Two accumulators per row of X (even / odd vectors) halve the FMA dependency chain.
  __m512 acc[MM][2];
  for (int m = 0; m < MM; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  auto lut_of = [&](int64_t g) QC_AVX512_LAMBDA {
    const int64_t i = (g - g0) * a.stats_stride;
    return _mm512_mul_ps(_mm512_set1_ps(s[i]), _mm512_sub_ps(iota, _mm512_set1_ps(z[i])));
  };
  auto step = [&](int64_t v, __m512 lut, int k) QC_AVX512_LAMBDA {
    const __m512 w = _mm512_permutexvar_ps(CodeVector<BITS>(qrow + (v >> 1) * 4 * BITS, v & 1), lut);
    for (int m = 0; m < MM; ++m) {
      acc[m][k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.x + m * a.xstride + 16 * v), acc[m][k]);
    }
  };
  if (per_group == 1) {  // beta1 = 16 (SpQR's default): one vector per group, no inner loop
    const int64_t v1 = std::min(n_vec, g1);
    int64_t g = g0;
    for (; g + 1 < v1; g += 2) {
      step(g, lut_of(g), 0);
      step(g + 1, lut_of(g + 1), 1);
    }
    if (g < v1) step(g, lut_of(g), 0);
  } else {
    int64_t v = g0 * per_group;
    for (int64_t g = g0; g < g1; ++g) {
      const __m512 lut = lut_of(g);
      for (const int64_t v1 = std::min(n_vec, (g + 1) * per_group); v < v1; ++v) step(v, lut, v & 1);
    }
  }
  for (int m = 0; m < MM; ++m) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][1]);
  for (int m = 0; m < MM; ++m) y[m] += _mm512_reduce_add_ps(acc[m][0]);
}

template <int BITS>
constexpr GemvRowAvx512Fn kRowFns[8] = {nullptr,           &GemvRow<BITS, 1>, &GemvRow<BITS, 2>, &GemvRow<BITS, 3>,
                                        &GemvRow<BITS, 4>, &GemvRow<BITS, 5>, &GemvRow<BITS, 6>, &GemvRow<BITS, 7>};

bool CpuHasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace

GemvRowAvx512Fn GemvRowAvx512(int64_t bits, int64_t M) {
  if (!CpuHasAvx512() || M < 1 || M > 7) return nullptr;
  switch (bits) {
    case 2: return kRowFns<2>[M];
    case 3: return kRowFns<3>[M];
    case 4: return kRowFns<4>[M];
    default: return nullptr;
  }
}

#else  // not x86-64 GCC/Clang: the portable path only

GemvRowAvx512Fn GemvRowAvx512(int64_t, int64_t) { return nullptr; }

#endif

}  // namespace Cpu
}  // namespace qcompiler
