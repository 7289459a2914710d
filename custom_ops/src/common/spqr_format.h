// qcompiler::SpQRMatMul storage format helpers shared by the CPU kernel (g++) and the CUDA kernel (nvcc).
// The format is specified in docs/spqr-format.md; the NumPy reference decoder is qcompiler/graph/format.py.
// No ONNX Runtime header here: this file is included by .cu files.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPQR_HD __host__ __device__ __forceinline__
#else
#define SPQR_HD inline
#endif

namespace qcompiler {
namespace spqr {

constexpr int kChunk = 32;  // codes per packing chunk

// The optional `activation` attribute (docs/spqr-format.md): none ("" or absent), or "silu_mul": with Z = X·Wᵀ + bias
// ([M, N], N even), Y[m, j] = silu(Z[m, j]) · Z[m, N/2 + j] for j < N/2 (a SwiGLU MLP's gate and up rows in one node).
constexpr int kActivationNone = 0;
constexpr int kActivationSiluMul = 1;

// Node attributes of one SpQRMatMul (validated by ValidateAttributes).
struct Attributes {
  int64_t K = 0;                // input features
  int64_t N = 0;                // output features
  int64_t bits = 0;             // weight code width: 2, 3, 4 or 8
  int64_t group_size = 0;       // beta1: columns per first-level group
  int64_t stat_bits = 0;        // 0: fp16 scales/zeros; 2..4: quantized with second-level stats
  int64_t stat_group_size = 0;  // beta2: output rows per second-level stats group
  int64_t accuracy_level = 0;   // optional; 4: the CPU kernel may quantize X to int8 (per 32 columns)
  int activation = 0;           // optional `activation` attribute: kActivationNone or kActivationSiluMul

  SPQR_HD int64_t out_cols() const { return activation == 0 ? N : N / 2; }  // Y's last dim
  SPQR_HD int64_t n_groups() const { return (K + group_size - 1) / group_size; }
  SPQR_HD int64_t n_stat_groups() const { return (N + stat_group_size - 1) / stat_group_size; }
};

// Bytes of one packed row of `n_codes` codes of width `bits`: ceil(n/32) chunks of 4*bits bytes.
SPQR_HD int64_t PackedRowBytes(int64_t n_codes, int64_t bits) { return (n_codes + kChunk - 1) / kChunk * 4 * bits; }

// Code `idx` of a packed row (random access; used for the packed first-level statistics and by the CUDA lanes).
SPQR_HD uint32_t ExtractCode(const uint8_t* row, int bits, int64_t idx) {
  const uint8_t* chunk = row + (idx / kChunk) * 4 * bits;
  const int i = static_cast<int>(idx % kChunk);
  if (bits == 8) return chunk[i];
  if (bits == 4) return i < 16 ? (chunk[i] & 15u) : (chunk[i - 16] >> 4);
  uint32_t code = (chunk[i & 7] >> (2 * (i >> 3))) & 3u;
  if (bits == 3) {
    const uint32_t hi_byte = chunk[8 + (i >> 3)];  // little-endian uint32 at bytes 8..11: bit i is in byte i/8
    code |= ((hi_byte >> (i & 7)) & 1u) << 2;
  }
  return code;
}

// All 32 codes of one packed chunk (sequential decode; written so that the compiler vectorizes each loop).
inline void DecodeChunk(const uint8_t* chunk, int bits, uint8_t* out /*[32]*/) {
  if (bits == 8) {  // byte i is code i
    for (int i = 0; i < kChunk; ++i) out[i] = chunk[i];
    return;
  }
  if (bits == 4) {
    for (int i = 0; i < 16; ++i) out[i] = chunk[i] & 15;
    for (int i = 0; i < 16; ++i) out[16 + i] = chunk[i] >> 4;
    return;
  }
  for (int s = 0; s < 4; ++s)
    for (int i = 0; i < 8; ++i) out[8 * s + i] = (chunk[i] >> (2 * s)) & 3;
  if (bits == 3) {  // the little-endian word at bytes 8..11: bit i is bit 2 of code i (a loop compilers vectorize)
    const uint32_t h = static_cast<uint32_t>(chunk[8]) | static_cast<uint32_t>(chunk[9]) << 8 |
                       static_cast<uint32_t>(chunk[10]) << 16 | static_cast<uint32_t>(chunk[11]) << 24;
    for (int i = 0; i < 32; ++i) out[i] |= static_cast<uint8_t>(((h >> i) & 1u) << 2);
  }
}

// IEEE fp16 bits -> fp32 (exact; usable on host and device without cuda_fp16.h).
SPQR_HD float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace spqr
}  // namespace qcompiler
