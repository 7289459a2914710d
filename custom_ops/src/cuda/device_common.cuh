// Device helpers shared by the SpQRMatMul CUDA kernels (decode_gemv.cu, prefill.cu, generic_rows.cu): conversions,
// 32-bit division, the first-level statistics of a row and group (bilevel statistics decoded in place), code quads
// from packed words, the bias. Each kernel file includes it (internal linkage: a copy per file, all inlined).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/spqr_format.h"
#include "cuda/kernels.cuh"
#include "cuda/launch.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

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

}  // namespace
}  // namespace Cuda
}  // namespace qcompiler
