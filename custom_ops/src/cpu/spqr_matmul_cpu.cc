// CPU kernel of qcompiler::SpQRMatMul: Y[m, n] = sum_k X[m, k] * W[n, k] + bias[n], W decoded on the fly.
//
// X is converted to fp32 and permuted once per call (Xp[m, j] = X[m, perm[j]]), so the permutation costs nothing
// inside the loops; W is decoded row by row (codes -> s*(q - z) with that row's group statistics, then the row's
// outliers added) in stored (permuted) column order. No dense copy of W is kept between calls. Two paths, both split
// over output rows n with ORT's intra-op thread pool:
// - rows (M < kGemmMinRows, decode): each task decodes kRowBlock rows of W at a time and dots them with each X row;
// - GEMM (prefill): each task decodes a tile of kNr rows of W once, transposed to [K, kNr], and multiplies it with
//   all of X by a kMr x kNr register-blocked micro-kernel (X values broadcast, W rows as vectors), K in blocks of
//   kKc so the tile block stays in L1; partial sums live in an [M, kNr] fp32 buffer of the task.
#include "cpu/spqr_matmul_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace qcompiler {
namespace Cpu {
namespace {

using spqr::Attributes;
using spqr::BoundInputs;

inline float HalfToFloat(uint16_t bits) { return Ort::Float16_t::FromBits(bits).ToFloat(); }

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
  const float* xp = nullptr;  // [M, K] fp32, permuted to stored column order
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

// Decoded row n of W in stored column order, outliers included: w[j] = s_g * (q - z_g) (+ delta).
void DecodeRow(const Job& j, int64_t n, float* w, uint8_t* codes, float* s, float* z) {
  const Attributes& a = j.a;
  const int bits = static_cast<int>(a.bits);
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  const uint8_t* qrow = j.qweight + n * spqr::PackedRowBytes(a.K, a.bits);
  for (int64_t c = 0; c < chunks; ++c) spqr::DecodeChunk(qrow + c * 4 * bits, bits, codes + c * spqr::kChunk);
  RowStats(j, n, s, z);
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
      DotRows(w.get(), j.xp + m * K, K, dots);
      for (int r = 0; r < rows; ++r) Store(j, m, n0 + r, dots[r] + b[r]);
    }
  }
}

// GEMM path, one task = rows [n0, n0 + kNr) of W (Y columns) for all M rows of X.
void TileTask(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const Attributes& a = j.a;
  const int64_t K = a.K, M = j.M, G = a.n_groups();
  const int64_t n0 = static_cast<int64_t>(task) * kNr;
  const int rows = static_cast<int>(std::min<int64_t>(kNr, a.N - n0));
  const int64_t k_pad = (K + spqr::kChunk - 1) / spqr::kChunk * spqr::kChunk;
  const int64_t m_pad = (M + kMr - 1) / kMr * kMr;
  // wt [K, kNr] (rows past N stay zero), acc [m_pad, kNr], one decoded row, its statistics.
  std::unique_ptr<float[]> buf(new float[K * kNr + m_pad * kNr + K + 2 * G]());
  float* wt = buf.get();
  float* acc = wt + K * kNr;
  float* row = acc + m_pad * kNr;
  float* s = row + K;
  float* z = s + G;
  std::unique_ptr<uint8_t[]> codes(new uint8_t[k_pad]);
  for (int r = 0; r < rows; ++r) {
    DecodeRow(j, n0 + r, row, codes.get(), s, z);
    for (int64_t k = 0; k < K; ++k) wt[k * kNr + r] = row[k];
  }
  const float* x[kMr];
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
      // Rows past M repeat the last row; their sums land in acc's padding and are never stored.
      for (int i = 0; i < kMr; ++i) x[i] = j.xp + std::min(m0 + i, M - 1) * K + k0;
      MicroKernel(x, wt + k0 * kNr, kc, acc + m0 * kNr);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float b = BiasOf(j, n0 + r);
    for (int64_t m = 0; m < M; ++m) Store(j, m, n0 + r, acc[m * kNr + r] + b);
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
    for (int64_t k = 0; k < a.K; ++k) {
      if (perm[k] < 0 || perm[k] >= a.K) {
        throw Ort::Exception(prefix + "perm[" + std::to_string(k) + "]=" + std::to_string(perm[k]) +
                                 " is out of range for K=" + std::to_string(a.K),
                             ORT_INVALID_ARGUMENT);
      }
    }
  }
}

struct SpQRMatMulCpuKernel : spqr::KernelBase<SpQRMatMulCpuKernel> {
  SpQRMatMulCpuKernel(const OrtKernelInfo* info, ONNXTensorElementDataType x_type)
      : prefix_(spqr::ErrorPrefix(info)), attrs_(spqr::ReadAttributes(info, prefix_)), x_type_(x_type) {}

  void Compute(OrtKernelContext* context) {
    const Attributes& a = attrs_;
    BoundInputs b = spqr::BindInputs(context, a, x_type_, prefix_, /*host_data=*/true);
    CheckIndices(b, a, prefix_);
    Ort::KernelContext ctx(context);
    Ort::UnownedValue y = ctx.GetOutput(0, b.y_shape);
    if (b.M == 0) return;

    // X -> fp32 in stored column order.
    const int64_t M = b.M, K = a.K;
    std::vector<float> xp(static_cast<size_t>(M * K));
    const bool half_x = x_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const float* xf = b.in[spqr::kX].as<float>();
    const uint16_t* xh = b.in[spqr::kX].as<uint16_t>();
    const int32_t* perm = b.in[spqr::kPerm].present() ? b.in[spqr::kPerm].as<int32_t>() : nullptr;
    for (int64_t m = 0; m < M; ++m) {
      float* dst = xp.data() + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = m * K + (perm ? perm[k] : k);
        dst[k] = half_x ? HalfToFloat(xh[src]) : xf[src];
      }
    }

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
    if (half_x) {
      j.y_f16 = reinterpret_cast<uint16_t*>(y.GetTensorMutableData<Ort::Float16_t>());
    } else {
      j.y_f32 = y.GetTensorMutableData<float>();
    }
    if (M >= kGemmMinRows) {
      ctx.ParallelFor(&TileTask, static_cast<size_t>((a.N + kNr - 1) / kNr), 0, &j);
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
