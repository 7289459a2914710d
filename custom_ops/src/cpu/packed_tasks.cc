// Drivers of the CPU kernel's packed paths (packed.h): ParallelFor tasks that run the ISA kernels a Job carries (the
// packed GEMV over slices of X, the packed prefill GEMM), add outliers and bias, and store Y; and the per-call
// preparation of X for them.
#include "cpu/cpu_job.h"

#include <algorithm>
#include <vector>

namespace qcompiler {
namespace Cpu {
namespace {

// y[i] += a * x[i], i < n.
QC_X86_CLONES void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

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

void ConvertTask(void* user, size_t task) {
  const ConvertJob& c = *static_cast<const ConvertJob*>(user);
  const int64_t m0 = static_cast<int64_t>(task) * kConvertRows;
  ConvertXRows(c.x, c.half_x, c.perm, c.K, c.xstride, /*lane_x=*/false, c.xp, m0, std::min(c.M, m0 + kConvertRows));
}

void PackedPrepTask(void* user, size_t i) {
  const PackedPrep& p = *static_cast<const PackedPrep*>(user);
  const PackedWeights& pw = *p.pw;
  const int64_t m0 = p.slice_begin[i], mm = p.slice_rows[i];
  ConvertXRows(p.x, p.half_x, p.perm, p.K, p.xstride, /*lane_x=*/false, p.xp, m0, m0 + mm);
  const float* x = p.xp + m0 * p.xstride;
  if (p.xq != nullptr) {
    p.int8_inputs(pw, x, p.xstride, mm, p.xq + m0 * p.xq_row, p.xd + m0 * p.xd_row, p.xg + m0 * pw.G, pw.G);
  } else {
    PackedGemvInputs(pw, x, p.xstride, mm, p.xs + m0 * p.xs_row, p.xg + m0 * pw.G, pw.G);
  }
  if (p.xt != nullptr) {  // k outer: each k writes the slice's mm values contiguously (m outer wrote 2 KB apart)
    for (int64_t k = 0; k < p.K; ++k)
      for (int64_t m = m0; m < m0 + mm; ++m) p.xt[k * p.M + m] = p.xp[m * p.xstride + k];
  }
}

}  // namespace Cpu
}  // namespace qcompiler
