// Pre-packed weights of the CPU decode (GEMV) path: built once per session from constant inputs.
//
// The stored format (docs/spqr-format.md) keeps each output row's codes together. For M < 8 the kernel wants the
// opposite: 16 output rows side by side in one AVX-512 register (lane = row), so that one broadcast x value
// multiplies 16 weights and each group's statistics scale a whole vector at once. The packed layout:
//
// - codes: [blocks][chunks][bits][16] uint32, block = 16 output rows, chunk = 32 columns (the storage chunk).
//   Lane r of word w holds row (16·block + r)'s 32 codes of the chunk as 32·bits contiguous bits, in the order
//   given by PieceOf: 2-bit codes 16 per word, 4-bit 8 per word, 8-bit 4 per word, 3-bit 10 per word (codes 30 and 31 fill the
//   two spare bits of each of the three words). A code is read as `float(word & mask)` (the field left in place,
//   an exact power-of-two multiple of the code) times a copy of x scaled by the inverse power of two, so decoding
//   costs one AND and one conversion per 16 weights.
// - statistics per (block, group): with quantized statistics whose second-level groups hold whole blocks
//   (stat_bits 2..4, stat_group_size % 16 == 0), the 16 rows' scale and zero codes as bytes (scale | zero << 4)
//   plus the four second-level values as fp32; otherwise the decoded fp32 scale and zero of each row.
//
// Rows past N and columns past K are zero codes (and get zero x), so the kernels have no tails.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/spqr_format.h"

namespace qcompiler {
namespace Cpu {

constexpr int kPackRows = 16;  // output rows per block (one AVX-512 register of fp32 lanes)

// Bits [shift, shift + width) of word `word` of a packed chunk hold bits [low, low + width) of code `code`.
struct Piece {
  int code, word, shift, width, low;
};

constexpr int PiecesPerChunk(int bits) { return bits == 3 ? 34 : 32; }

constexpr Piece PieceOf(int bits, int p) {
  if (bits == 3) {
    if (p < 30) return {p, p / 10, 3 * (p % 10), 3, 0};
    return p == 30 ? Piece{30, 0, 30, 2, 0} : p == 31 ? Piece{30, 1, 30, 1, 2}
         : p == 32 ? Piece{31, 1, 31, 1, 0} : Piece{31, 2, 30, 2, 1};
  }
  return {p, p / (32 / bits), bits * (p % (32 / bits)), bits, 0};
}

// Allocator of the packed buffers: blocks of 2 MiB and more are 2 MiB aligned and advised as transparent huge pages
// (Linux), so the kernels' streams over tens of MB do not walk a 4 KiB page table (hardware prefetchers also stop
// at page boundaries). Where THP is off (or "never") the advice is ignored and the pages are ordinary.
template <class T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t{2} << 20;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < kHuge) return static_cast<T*>(::operator new(bytes));
    void* p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) < kHuge) {
      ::operator delete(p);
    } else {
      std::free(p);
    }
  }
  template <class U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <class T>
using PackedVector = std::vector<T, HugePageAllocator<T>>;

// 2^e as a compile-time float (the exact factors between a field's place value and its code).
constexpr float Pow2(int e) {
  float v = 1.f;
  for (; e > 0; --e) v *= 2.f;
  for (; e < 0; ++e) v *= 0.5f;
  return v;
}

struct PackedWeights {
  int64_t K = 0, N = 0, bits = 0, group_size = 0, G = 0, chunks = 0, blocks = 0;
  bool coded_stats = false;         // statistics as codes + second-level values (else decoded per row)
  int64_t stat_bits = 0;            // coded_stats: the scale and zero codes' width (2..4)
  bool half_stats = false;          // not coded_stats: the rows' s and z as the stored fp16 (stat_bits 0), else fp32
  PackedVector<uint32_t> codes;      // [blocks][chunks][bits][16] (fp32 path)
  // int8 path (accuracy_level 4): [blocks][chunks][4][16]; byte b of word i of a lane holds the codes of columns
  // 8i + b (low nibble) and 8i + 4 + b (high nibble), so one AND (or shift + AND) gives 4 consecutive codes per
  // lane as bytes for vpdpbusd.
  PackedVector<uint32_t> nibbles;
  // int8 path, 3-bit codes, where the ISA's int8 kernels read them (CpuKernels::int8_codes3; instead of nibbles: 3 bits
  // a weight in memory, not 4): [blocks][chunks][3][16]; byte b of each word of a lane holds the codes f_q of columns
  // 4q + b, two whole ones per word (word 0: f0 | f1 << 3, word 1: f2 | f3 << 3, word 2: f4 | f5 << 3) and in the
  // top two bits the parts of f6 and f7 (word 0: f6's low two bits, word 2: f7's, word 1: their high bits, f6's at
  // bit 6, f7's at bit 7), so one shift and AND give a quad's 4 codes per lane as bytes (two shifts, two ANDs and
  // an OR for quads 6 and 7).
  PackedVector<uint32_t> codes3;
  // int8 path, 8-bit codes (where the ISA's int8 kernels take them, CpuKernels::int8_codes8): [blocks][chunks][8][16];
  // word i of a lane holds the codes of columns 4i..4i+3, byte b = column 4i + b (the stored bytes, regrouped by
  // block: 8 bits a weight in memory, as stored).
  PackedVector<uint32_t> bytes;
  PackedVector<uint8_t> stat_codes;  // coded_stats: [blocks][G][16] (scale code | zero code << 4)
  // coded_stats: [blocks >> stat_shift][G][4] (ss, sz, zs, zz): one row per second-level group of rows (2^stat_shift
  // blocks share it; shift 0 where stat_group_size / 16 is not a power of two); else [blocks][G][2][16] (s, z) where
  // the statistics were quantized (second-level groups that split a block)
  PackedVector<float> stat_values;
  // half_stats: [blocks][G][2][16] fp16 (s, z), the stored values unchanged (half the bytes of fp32 per call: 1 bit
  // per weight at 32-column groups, not 2; converted by vcvtph2ps)
  PackedVector<uint16_t> stat_halves;
  int stat_shift = 0;
};

// Hint that the whole pages inside [p, p + bytes) will not be read again (the stored tensors a packed copy replaces):
// Linux's MADV_PAGEOUT reclaims them. ONNX Runtime maps a model's external data file, so the initializers' pages are
// file-backed: reclaimed, they leave the process's resident set, and a later read (there is none on the packed
// paths) faults them in again from the file; anonymous pages are swapped out or kept. The hint never changes what a
// read returns. No-op on other systems and where the kernel refuses it.
void ReleasePages(const void* p, size_t bytes);

// The four second-level values of block blk, group g (coded_stats).
inline const float* CodedStatValues(const PackedWeights& w, int64_t blk, int64_t g) {
  return w.stat_values.data() + ((blk >> w.stat_shift) * w.G + g) * 4;
}

// Whether the packed layouts can hold this node's groups (group size 16 or a multiple of 32; any statistics).
inline bool PackableShape(const spqr::Attributes& a) {
  return (a.group_size == 16 || a.group_size % 32 == 0) && a.K <= (int64_t{1} << 31) && a.N <= (int64_t{1} << 31);
}

// Whether the packed GEMV path can take this node (2..4-bit codes, PackableShape).
inline bool Packable(const spqr::Attributes& a) { return a.bits >= 2 && a.bits <= 4 && PackableShape(a); }

// Whether the packed paths can take this node's 8-bit codes (PackableShape), on ISA tables with kernels for them
// (CpuKernels::int8_codes8, fp32_codes8).
inline bool PackableCodes8(const spqr::Attributes& a) { return a.bits == 8 && PackableShape(a); }

// 32-bit words per chunk and lane of the packed codes the kernels read (the block's cache lines per chunk).
inline int64_t PackedWordsPerChunk(const PackedWeights& w) {
  return !w.bytes.empty() ? 8 : !w.codes3.empty() ? 3 : !w.nibbles.empty() ? 4 : w.bits;
}

// Packs the constant inputs (scales/zeros: fp16 [G, N] or packed codes; stats2: fp16 [G, N2, 4] or nullptr):
// `codes` for the fp32 path, or with `int8` `nibbles` (`codes3` for 3-bit codes with `int8_codes3`, `bytes` for
// 8-bit codes).
PackedWeights Pack(const spqr::Attributes& a, const uint8_t* qweight, const void* scales, const void* zeros,
                   const uint16_t* stats2, bool int8 = false, bool int8_codes3 = false);

// The words of codes3 for one lane's 32 codes of a chunk (q[k] = the code of column k, < 8).
void PackChunkCodes3(const uint8_t* q, uint32_t words[3]);

// What the packed GEMV kernel reads per call (X in stored column order, MM rows).
struct PackedGemvArgs {
  const PackedWeights* w = nullptr;
  // [chunks][PiecesPerChunk(bits)][MM]: x of each piece's column times 2^(low - shift), the MM rows of X side by
  // side (one cache line serves a piece for all rows)
  const float* xs = nullptr;
  const float* xg = nullptr;  // [MM][G]: sum of x over each group
  int64_t xg_stride = 0;
  // int8 path: X quantized per 32 columns, or per 16 where the weight's groups are 16 columns (symmetric, round to
  // nearest): xq [chunks][8][MM] (4 int8 per word: the columns of one quad), xd [chunks][XScalesPerChunk][MM] (the
  // scales); xg as above (exact fp32 sums)
  const int32_t* xq = nullptr;
  const float* xd = nullptr;
  float* y = nullptr;  // [MM][y_stride]: row n of W at column n - 16·b0 (no bias, no outliers)
  int64_t y_stride = 0;
};

// Builds args.xs ([chunks][P][mm]) and args.xg rows (xg + m * xg_stride) for mm rows of X (x + m * xstride, stored
// column order, zero past K).
void PackedGemvInputs(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, float* xs, float* xg,
                      int64_t xg_stride);

// Rows of X one kernel call takes (larger M: several calls over slices of X, see spqr_matmul_cpu.cc).
constexpr int kPackedMaxRows = 8;

// Scales of X per 32-column chunk on the int8 path: 2 (one per 16 columns) where the weight's groups are 16 columns
// (the kernels keep the two halves' integer sums apart there anyway, and a block of 16 shares its scale with fewer
// large activations: SmolLM2's q/k/v inputs lost 0.5 % perplexity at one scale per 32), else 1.
inline int64_t XScalesPerChunk(const PackedWeights& w) { return w.group_size == 16 ? 2 : 1; }

// The int8 path's xq / xd ([chunks][8][mm], [chunks][XScalesPerChunk][mm]) and xg for mm rows of X (as
// PackedGemvInputs).
void PackedGemvInt8Inputs(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq, float* xd,
                          float* xg, int64_t xg_stride);
using PackedInt8InputsFn = void (*)(const PackedWeights& w, const float* x, int64_t xstride, int64_t mm, int32_t* xq,
                                    float* xd, float* xg, int64_t xg_stride);
// The same with AVX-512 (identical values: the max is exact in any order, the rounding the same instruction), or
// nullptr without it.
PackedInt8InputsFn PackedInt8InputsAvx512();
// xg[g] = the sum of x over group g's columns, in column order (PackedGemvInputs' and PackedGemvInt8Inputs' xg row).
void PackedGroupSums(const PackedWeights& w, const float* x, float* xg);

// y for blocks [b0, b1) of rows (16 rows each) and M (1..kPackedMaxRows) rows of X, or nullptr where this
// CPU/build lacks AVX-512.
using PackedGemvFn = void (*)(const PackedGemvArgs& args, int64_t b0, int64_t b1);
PackedGemvFn PackedGemvAvx512(const PackedWeights& w, int64_t M);
// y[n - n0] += sum over p in [row_ptr[n], row_ptr[n + 1]) of val[p] * x[col[p]] for rows n in [n0, n1): the
// outliers as the op stores them (fp16 values, uint16 columns; no copy: 4 bytes per outlier stay 4 bytes of
// traffic), F16C conversions and a running fp64 sum over the range (no branch per row), or nullptr where the CPU
// lacks AVX + FMA + F16C.
using PackedOutlierRowsFn = void (*)(const uint16_t* val, const uint16_t* col, const int32_t* row_ptr,
                                     const float* x, int64_t n0, int64_t n1, float* y);
PackedOutlierRowsFn PackedOutlierRowsF16c();
// Prefill (GEMM) on the packed weights: chunks [c0, c1) of a block of 16 rows decoded into a column-major fp32 tile,
// wt[16 (k - 32 c0) + r] = W[16 blk + r, k] (stored column order; columns past K get finite values that meet zero
// x), multiplied with the rows of X by a register-blocked micro-kernel.
using PackedDecodeFn = void (*)(const PackedWeights& w, int64_t blk, int64_t c0, int64_t c1, float* wt);
PackedDecodeFn PackedDecodeAvx512(const PackedWeights& w);  // nullptr without AVX-512 (or without w.codes)
constexpr int kGemmRowsMax = 12;                              // rows of X per micro-kernel call
// c[16 m + r] += sum_{k < kc} x[m * xstride + k] * wt[16 k + r] for m < mr (1..kGemmRowsMax)
using PackedMicroFn = void (*)(const float* x, int64_t xstride, const float* wt, int64_t kc, float* c);
PackedMicroFn PackedMicroAvx512(int mr);
// dst[i] = src[i] (fp16 bits) as fp32 for i < n, 16 at a time (vcvtph2ps), or nullptr without AVX-512: the packed
// GEMM's outliers, converted once per call in order instead of one libgcc call (no F16C in the baseline build) each.
using HalvesToFloatsFn = void (*)(const uint16_t* src, float* dst, int64_t n);
HalvesToFloatsFn HalvesToFloatsAvx512();

// The same fp32 GEMV with AVX2 + FMA (x86-64 without AVX-512), for M = 1..kPackedAvx2MaxRows, or nullptr.
constexpr int kPackedAvx2MaxRows = 4;
PackedGemvFn PackedGemvAvx2(const PackedWeights& w, int64_t M);
bool PackedAvx2Available();  // x86-64 with AVX2 + FMA
// The int8 path on AVX2 + FMA (vpmaddubsw on w.nibbles or w.codes3; vpmaddwd on w.bytes), for M =
// 1..kPackedAvx2MaxRows (w.bytes: 1..kPackedCodes8MaxRows), or nullptr. With 8-bit codes (w.bytes, and w.codes at
// bits 8 through PackedGemvAvx2) the AVX2 kernels also serve the AVX-512 table (no AVX-512 kernels of its own for
// them yet), so its slices of 8-bit codes are at most kPackedCodes8MaxRows rows too.
constexpr int kPackedCodes8MaxRows = 4;
PackedGemvFn PackedGemvInt8Avx2(const PackedWeights& w, int64_t M);

// Whether this CPU/build has the AVX-512 packed kernels (F, BW, VL, DQ).
bool PackedAvx512Available();
// Whether this CPU/build has the int8 path (AVX512-VNNI).
bool PackedInt8Available();
// The int8 path (needs AVX512-VNNI and w.nibbles; w.bytes: PackedGemvInt8Avx2), or nullptr.
PackedGemvFn PackedGemvVnni(const PackedWeights& w, int64_t M);

}  // namespace Cpu
}  // namespace qcompiler
