// Packing of the decode path's weights (layout in packed.h); portable C++, run once per session.
#include "cpu/packed.h"

#include "cpu/clones.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace qcompiler {
namespace Cpu {
namespace {

float Half(uint16_t h) { return spqr::HalfBitsToFloat(h); }

template <int BITS>
void PackCodes(const spqr::Attributes& a, const uint8_t* qweight, PackedWeights& w) {
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, BITS);
  uint8_t q[spqr::kChunk];
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t blk = n / kPackRows, lane = n % kPackRows;
    for (int64_t c = 0; c < w.chunks; ++c) {
      spqr::DecodeChunk(qweight + n * row_bytes + c * 4 * BITS, BITS, q);
      uint32_t words[BITS] = {};
      for (int p = 0; p < PiecesPerChunk(BITS); ++p) {
        const Piece pc = PieceOf(BITS, p);
        words[pc.word] |= ((static_cast<uint32_t>(q[pc.code]) >> pc.low) & ((1u << pc.width) - 1u)) << pc.shift;
      }
      uint32_t* dst = w.codes.data() + ((blk * w.chunks + c) * BITS) * kPackRows + lane;
      for (int i = 0; i < BITS; ++i) dst[i * kPackRows] = words[i];
    }
  }
}

void PackNibbles(const spqr::Attributes& a, const uint8_t* qweight, PackedWeights& w) {
  const int bits = static_cast<int>(a.bits);
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, bits);
  uint8_t q[spqr::kChunk];
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t blk = n / kPackRows, lane = n % kPackRows;
    for (int64_t c = 0; c < w.chunks; ++c) {
      spqr::DecodeChunk(qweight + n * row_bytes + c * 4 * bits, bits, q);
      uint32_t* dst = w.nibbles.data() + ((blk * w.chunks + c) * 4) * kPackRows + lane;
      for (int i = 0; i < 4; ++i) {
        uint32_t word = 0;
        for (int b = 0; b < 4; ++b) word |= static_cast<uint32_t>(q[8 * i + b] | q[8 * i + 4 + b] << 4) << (8 * b);
        dst[i * kPackRows] = word;
      }
    }
  }
}

void PackBytes(const spqr::Attributes& a, const uint8_t* qweight, PackedWeights& w) {
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, 8);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t blk = n / kPackRows, lane = n % kPackRows;
    for (int64_t c = 0; c < w.chunks; ++c) {
      const uint8_t* q = qweight + n * row_bytes + c * spqr::kChunk;  // 8-bit rows: byte i is code i
      uint32_t* dst = w.bytes.data() + ((blk * w.chunks + c) * 8) * kPackRows + lane;
      for (int i = 0; i < 8; ++i) {
        uint32_t word;
        std::memcpy(&word, q + 4 * i, 4);  // little-endian: byte b = column 4i + b
        dst[i * kPackRows] = word;
      }
    }
  }
}

void PackCodes3(const spqr::Attributes& a, const uint8_t* qweight, PackedWeights& w) {
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, 3);
  uint8_t q[spqr::kChunk];
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t blk = n / kPackRows, lane = n % kPackRows;
    for (int64_t c = 0; c < w.chunks; ++c) {
      spqr::DecodeChunk(qweight + n * row_bytes + c * 4 * 3, 3, q);
      uint32_t words[3];
      PackChunkCodes3(q, words);
      uint32_t* dst = w.codes3.data() + ((blk * w.chunks + c) * 3) * kPackRows + lane;
      for (int i = 0; i < 3; ++i) dst[i * kPackRows] = words[i];
    }
  }
}

// xg[g] = sum of x over group g (the zero-point term of both packed kernels).
QC_CLONE_INLINE void GroupSums(const PackedWeights& w, const float* x, float* xg) {
  for (int64_t g = 0; g < w.G; ++g) {
    float sum = 0.f;
    const int64_t begin = g * w.group_size, end = begin + w.group_size < w.K ? begin + w.group_size : w.K;
    for (int64_t k = begin; k < end; ++k) sum += x[k];
    xg[g] = sum;
  }
}

}  // namespace

void PackChunkCodes3(const uint8_t* q, uint32_t words[3]) {
  for (int i = 0; i < 3; ++i) words[i] = 0;
  for (int b = 0; b < 4; ++b) {
    uint32_t f[8];
    for (int qd = 0; qd < 8; ++qd) f[qd] = q[4 * qd + b] & 7u;
    const uint32_t w0 = f[0] | f[1] << 3 | (f[6] & 3u) << 6;
    const uint32_t w1 = f[2] | f[3] << 3 | (f[6] >> 2) << 6 | (f[7] >> 2) << 7;
    const uint32_t w2 = f[4] | f[5] << 3 | (f[7] & 3u) << 6;
    words[0] |= w0 << (8 * b);
    words[1] |= w1 << (8 * b);
    words[2] |= w2 << (8 * b);
  }
}

void PackedGroupSums(const PackedWeights& w, const float* x, float* xg) { GroupSums(w, x, xg); }

void ReleasePages(const void* p, size_t bytes) {
#if defined(__linux__)
#ifndef MADV_PAGEOUT
  constexpr int MADV_PAGEOUT = 21;  // Linux 5.4 (older headers lack the name; older kernels answer EINVAL)
#endif
  const long page_size = sysconf(_SC_PAGESIZE);
  if (p == nullptr || page_size <= 0) return;
  const uintptr_t page = static_cast<uintptr_t>(page_size);
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);  // a hint: errors ignored
#else
  (void)p;
  (void)bytes;
#endif
}

PackedWeights Pack(const spqr::Attributes& a, const uint8_t* qweight, const void* scales, const void* zeros,
                   const uint16_t* stats2, bool int8, bool int8_codes3) {
  PackedWeights w;
  w.K = a.K;
  w.N = a.N;
  w.bits = a.bits;
  w.group_size = a.group_size;
  w.G = a.n_groups();
  w.chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  w.blocks = (a.N + kPackRows - 1) / kPackRows;
  if (int8 && a.bits == 8) {
    w.bytes.assign(static_cast<size_t>(w.blocks * w.chunks * 8 * kPackRows), 0u);
    PackBytes(a, qweight, w);
  } else if (int8 && int8_codes3 && a.bits == 3) {
    w.codes3.assign(static_cast<size_t>(w.blocks * w.chunks * 3 * kPackRows), 0u);
    PackCodes3(a, qweight, w);
  } else if (int8) {
    w.nibbles.assign(static_cast<size_t>(w.blocks * w.chunks * 4 * kPackRows), 0u);
    PackNibbles(a, qweight, w);
  } else {
    w.codes.assign(static_cast<size_t>(w.blocks * w.chunks * a.bits * kPackRows), 0u);
    if (a.bits == 2) PackCodes<2>(a, qweight, w);
    if (a.bits == 3) PackCodes<3>(a, qweight, w);
    if (a.bits == 4) PackCodes<4>(a, qweight, w);
    if (a.bits == 8) PackCodes<8>(a, qweight, w);
  }

  const int64_t G = w.G;
  w.coded_stats = a.stat_bits >= 2 && a.stat_bits <= 4 && a.stat_group_size % kPackRows == 0;
  if (w.coded_stats) {
    w.stat_bits = a.stat_bits;
    const int sb = static_cast<int>(a.stat_bits);
    const int64_t row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
    const int64_t N2 = a.n_stat_groups();
    const auto* sc = static_cast<const uint8_t*>(scales);
    const auto* zc = static_cast<const uint8_t*>(zeros);
    w.stat_codes.assign(static_cast<size_t>(w.blocks * G * kPackRows), 0);
    const int64_t per_group = a.stat_group_size / kPackRows;  // blocks per second-level group
    if ((per_group & (per_group - 1)) == 0) {  // a power of two (else one row per block)
      while ((int64_t{1} << w.stat_shift) < per_group) ++w.stat_shift;
    }
    w.stat_values.assign(static_cast<size_t>((((w.blocks - 1) >> w.stat_shift) + 1) * G * 4), 0.f);
    for (int64_t blk = 0; blk < w.blocks; ++blk) {
      const int64_t t = blk * kPackRows / a.stat_group_size;  // one second-level group for the whole block
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* codes = w.stat_codes.data() + (blk * G + g) * kPackRows;
        for (int64_t r = 0; r < kPackRows && blk * kPackRows + r < a.N; ++r) {
          const int64_t n = blk * kPackRows + r;
          codes[r] = static_cast<uint8_t>(spqr::ExtractCode(sc + g * row_bytes, sb, n) |
                                          spqr::ExtractCode(zc + g * row_bytes, sb, n) << 4);
        }
        const uint16_t* st = stats2 + (g * N2 + t) * 4;
        for (int i = 0; i < 4; ++i) w.stat_values[((blk >> w.stat_shift) * G + g) * 4 + i] = Half(st[i]);
      }
    }
    return w;
  }
  // fp16 statistics: kept as stored, in the block layout (no rounding: the kernels convert exactly)
  if (a.stat_bits == 0) {
    w.half_stats = true;
    w.stat_halves.assign(static_cast<size_t>(w.blocks * G * 2 * kPackRows), 0);
    const auto* sc = static_cast<const uint16_t*>(scales);
    const auto* zc = static_cast<const uint16_t*>(zeros);
    for (int64_t n = 0; n < a.N; ++n) {
      const int64_t blk = n / kPackRows, lane = n % kPackRows;
      for (int64_t g = 0; g < G; ++g) {
        uint16_t* dst = w.stat_halves.data() + (blk * G + g) * 2 * kPackRows;
        dst[lane] = sc[g * a.N + n];
        dst[kPackRows + lane] = zc[g * a.N + n];
      }
    }
    return w;
  }
  // Decoded per row (second-level groups that split a block).
  w.stat_values.assign(static_cast<size_t>(w.blocks * G * 2 * kPackRows), 0.f);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t blk = n / kPackRows, lane = n % kPackRows;
    for (int64_t g = 0; g < G; ++g) {
      float s, z;
      if (a.stat_bits == 0) {
        s = Half(static_cast<const uint16_t*>(scales)[g * a.N + n]);
        z = Half(static_cast<const uint16_t*>(zeros)[g * a.N + n]);
      } else {
        const int sb = static_cast<int>(a.stat_bits);
        const int64_t row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
        const uint16_t* st = stats2 + (g * a.n_stat_groups() + n / a.stat_group_size) * 4;
        s = Half(st[0]) * (static_cast<float>(
                               spqr::ExtractCode(static_cast<const uint8_t*>(scales) + g * row_bytes, sb, n)) -
                           Half(st[1]));
        z = Half(st[2]) * (static_cast<float>(
                               spqr::ExtractCode(static_cast<const uint8_t*>(zeros) + g * row_bytes, sb, n)) -
                           Half(st[3]));
      }
      float* dst = w.stat_values.data() + (blk * G + g) * 2 * kPackRows;
      dst[lane] = s;
      dst[kPackRows + lane] = z;
    }
  }
  return w;
}

QC_X86_CLONES void PackedGemvInputs(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, float* xs,
                                    float* xg, int64_t xg_stride) {
  const int bits = static_cast<int>(w.bits), P = PiecesPerChunk(bits);
  float factor[34];
  int code[34];
  for (int p = 0; p < P; ++p) {
    factor[p] = std::ldexp(1.0f, PieceOf(bits, p).low - PieceOf(bits, p).shift);  // exact powers of two
    code[p] = PieceOf(bits, p).code;
  }
  for (int64_t c = 0; c < w.chunks; ++c) {
    for (int p = 0; p < P; ++p) {
      const int64_t k = c * spqr::kChunk + code[p];
      float* dst = xs + (c * P + p) * mm;
      for (int64_t m = 0; m < mm; ++m) dst[m] = k < w.K ? x[m * xstride + k] * factor[p] : 0.f;
    }
  }
  for (int64_t m = 0; m < mm; ++m) GroupSums(w, x + m * xstride, xg + m * xg_stride);
}

namespace {

// One chunk's SPAN-column pieces → int8 codes and their scales (the loops in a shape the compiler vectorizes: the
// max as a halving tree of element-wise maxima, exact in any order; the rounding by nearbyint, which clones with
// SSE4.1 and later do in one instruction, round half to even as the scalar build does).
template <int SPAN>
QC_CLONE_INLINE void QuantizeChunk(const float* xs, int8_t* q, float* scales, int64_t scale_stride) {
  constexpr int H = spqr::kChunk / SPAN;
  for (int h = 0; h < H; ++h) {
    float t[SPAN];
    for (int k = 0; k < SPAN; ++k) t[k] = std::fabs(xs[h * SPAN + k]);
    for (int s = SPAN / 2; s > 0; s /= 2)
      for (int k = 0; k < s; ++k) t[k] = t[k] > t[k + s] ? t[k] : t[k + s];
    const float amax = t[0];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scales[h * scale_stride] = amax / 127.f;
    for (int k = 0; k < SPAN; ++k) {  // |x · inv| <= 127 (+ an ulp): the clamp only trims that ulp
      const float r = std::nearbyint(xs[h * SPAN + k] * inv);
      q[h * SPAN + k] = static_cast<int8_t>(r < -127.f ? -127.f : (r > 127.f ? 127.f : r));
    }
  }
}

template <int SPAN>
QC_CLONE_INLINE void Int8Inputs(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq, float* xd,
                       float* xg, int64_t xg_stride) {
  constexpr int64_t H = spqr::kChunk / SPAN;
  for (int64_t m = 0; m < mm; ++m) {
    const float* xr = x + m * xstride;  // zero past K up to whole chunks
    for (int64_t c = 0; c < w.chunks; ++c) {
      int8_t q[spqr::kChunk];
      QuantizeChunk<SPAN>(xr + c * spqr::kChunk, q, xd + c * H * mm + m, mm);
      for (int j = 0; j < 8; ++j) {
        int32_t word;
        std::memcpy(&word, q + 4 * j, 4);  // little-endian: column 4j + b in byte b
        xq[(c * 8 + j) * mm + m] = word;
      }
    }
    GroupSums(w, xr, xg + m * xg_stride);
  }
}

}  // namespace

QC_X86_CLONES void PackedGemvInt8Inputs(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm,
                                        int32_t* xq, float* xd, float* xg, int64_t xg_stride) {
  if (XScalesPerChunk(w) == 2) {
    Int8Inputs<16>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  } else {
    Int8Inputs<32>(w, x, xstride, mm, xq, xd, xg, xg_stride);
  }
}

}  // namespace Cpu
}  // namespace qcompiler
