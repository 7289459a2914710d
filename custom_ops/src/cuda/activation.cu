// The `activation` attribute's epilogue on CUDA (common/spqr_format.h): Y[m, j] = silu(Z[m, j]) · Z[m, N/2 + j] from
// the product Z the other kernels wrote to scratch. One thread per output element.
#include "cuda/device_common.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

constexpr int kActivationThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kActivationThreads) SiluMulKernel(const T* __restrict__ z, T* __restrict__ y,
                                                                    int64_t M, int64_t N) {
  const int64_t h = N / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kActivationThreads + threadIdx.x;
  if (i >= M * h) return;
  const int64_t m = i / h, j = i - m * h;
  const float g = ToFloat(z[m * N + j]);
  Store(y + i, g / (1.0f + expf(-g)) * ToFloat(z[m * N + h + j]));
}

}  // namespace

void LaunchSiluMul(const void* z, void* y, int64_t M, int64_t N, bool half, cudaStream_t s) {
  const int64_t total = M * (N / 2);
  if (total == 0) return;
  const dim3 block(kActivationThreads);
  const dim3 grid(static_cast<unsigned>((total + kActivationThreads - 1) / kActivationThreads));
  if (half) {
    QC_LAUNCH(SiluMulKernel<__half>, grid, block, 0, s, static_cast<const __half*>(z), static_cast<__half*>(y), M, N);
  } else {
    QC_LAUNCH(SiluMulKernel<float>, grid, block, 0, s, static_cast<const float*>(z), static_cast<float*>(y), M, N);
  }
}

}  // namespace Cuda
}  // namespace qcompiler
