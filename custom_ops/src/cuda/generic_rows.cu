// SpQRMatMul CUDA row kernel (docs/kernels.md): every call the decode GEMV and the prefill kernel do not take (fp32 X
// with M > 8, group sizes other than 16 or a multiple of 32), one warp per output row n, decoding W on the fly.
//
// SpQRMatMulKernel: lane l of the warp owns column 32c + l of every 32-code chunk c: it extracts its code from the
// chunk (all lanes read the same 4*bits bytes), applies its group's (scale, zero) (bilevel statistics decoded in
// place), gathers X[m, perm[k]] directly (no permuted copy of X) and accumulates up to kMTile rows of X at once in
// fp32. Outliers are added by striding the row's CSR entries over the lanes; a warp shuffle reduction finishes the
// dot products.
#include "cuda/device_common.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) SpQRMatMulKernel(const SpQRMatMulArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= a.N) return;  // whole warp exits together

  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  const uint8_t* qrow = a.qweight + n * spqr::PackedRowBytes(a.K, a.bits);
  const int64_t chunks = (a.K + spqr::kChunk - 1) / spqr::kChunk;
  const float bias = BiasOf(a, n);
  const int32_t p_begin = a.row_ptr ? a.row_ptr[n] : 0;
  const int32_t p_end = a.row_ptr ? a.row_ptr[n + 1] : 0;

  for (int64_t m0 = 0; m0 < a.M; m0 += kMTile) {
    const int mt = static_cast<int>(min(static_cast<int64_t>(kMTile), a.M - m0));
    const T* xm = x + m0 * a.K;
    float acc[kMTile];
#pragma unroll
    for (int i = 0; i < kMTile; ++i) acc[i] = 0.f;

    int64_t cur_g = -1;
    float s = 0.f, z = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = c * spqr::kChunk + lane;
      if (k >= a.K) break;
      const int64_t g = Div(k, a.group_size);
      if (g != cur_g) {
        GroupStats(a, g, n, s, z);
        cur_g = g;
      }
      const float w = s * (static_cast<float>(spqr::ExtractCode(qrow, a.bits, k)) - z);
      const int64_t col = a.perm ? a.perm[k] : k;
#pragma unroll
      for (int i = 0; i < kMTile; ++i) {
        if (i < mt) acc[i] += w * ToFloat(xm[i * a.K + col]);
      }
    }
    for (int32_t p = p_begin + lane; p < p_end; p += 32) {
      const int64_t j = a.col_idx[p];
      const int64_t col = a.perm ? a.perm[j] : j;
      const float v = Half(a.values[p]);
#pragma unroll
      for (int i = 0; i < kMTile; ++i) {
        if (i < mt) acc[i] += v * ToFloat(xm[i * a.K + col]);
      }
    }
#pragma unroll
    for (int i = 0; i < kMTile; ++i) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
    if (lane == 0) {
      for (int i = 0; i < mt; ++i) Store(y + (m0 + i) * a.N + n, acc[i] + bias);
    }
  }
}

}  // namespace

void LaunchGenericRows(const SpQRMatMulArgs& args, cudaStream_t s) {
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((args.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (args.x_is_half) {
    QC_LAUNCH(SpQRMatMulKernel<__half>, grid, block, 0, s, args);
  } else {
    QC_LAUNCH(SpQRMatMulKernel<float>, grid, block, 0, s, args);
  }
}

}  // namespace Cuda
}  // namespace qcompiler
