// The gated activation a SpQRMatMul node may apply to its product (the `activation` attribute,
// common/spqr_format.h): the CPU kernel computes Z = X·Wᵀ + bias into scratch, then Y from Z here.
#pragma once

#include <cstdint>

namespace qcompiler {
namespace Cpu {

// Y[r, j] = silu(Z[r, j]) · Z[r, n/2 + j] for r < rows, j < n/2; Z is [rows, n], Y is [rows, n/2] (fp32). silu(z) =
// z / (1 + e^−z), e^−z by a degree-6 polynomial after range reduction (a few ulp from expf; its argument clamped to
// fp32's finite range, NaN stays NaN). Vectorized for AVX-512 and AVX2 where the CPU has them (function clones).
void SiluMulRows(const float* z, int64_t rows, int64_t n, float* y);

}  // namespace Cpu
}  // namespace qcompiler
