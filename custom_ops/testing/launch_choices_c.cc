// C entries of the CUDA launcher's modelled choices, built into both library-free test libraries (the emulation's,
// custom_ops/testing/emu, and the direct GPU runs', spqr_matmul_cuda_direct.cc): benchmark labels and the tests of the
// choices (tests/cuda_emu.py: LaunchChoices). ONNX Runtime's build does not contain them.
#include <cstdint>

#include "common/env_switches.h"
#include "cuda/spqr_matmul_cuda_impl.cuh"

extern "C" {

// Rows per warp the decode GEMV takes for M rows of X and N outputs on a GPU of `sms` multiprocessors.
__attribute__((visibility("default"))) int qc_gemv_rows_per_warp(int64_t M, int64_t N, int sms) {
  return qcompiler::Cuda::GemvRowsPerWarp(M, N, sms);
}

// 1 when the prefill kernel takes its 128 x 128 tile for M rows of X and N outputs on `sms` multiprocessors
// (QCOMPILER_CUDA_PREFILL_TILE, read at this call, forces one as it does for a launch).
__attribute__((visibility("default"))) int qc_prefill_uses_large_tile(int64_t M, int64_t N, int sms) {
  const int forced = qcompiler::env::ReadCudaSwitches().prefill_tile;
  if (forced != 0) return forced == 128 ? 1 : 0;
  return qcompiler::Cuda::PrefillUsesLargeTile(M, N, sms) ? 1 : 0;
}

}  // extern "C"
