// SiluMulRows (activation.h): one loop the compiler vectorizes, cloned per x86 ISA (ifunc dispatch at load time).
#include "cpu/activation.h"

#include "cpu/clones.h"

#include <cmath>
#include <cstring>

namespace qcompiler {
namespace Cpu {
namespace {

// e^t for t clamped to [−87.3, 88.7] (beyond: 0 and +inf follow from the clamp and the division below), written
// without branches or libm calls so that it vectorizes: t = n·ln2 + r with |r| ≲ ln2/2 (ln2 in two parts, Cody-Waite),
// e^r by the Cephes expf polynomial, 2^n by the exponent bits.
QC_CLONE_INLINE float ExpBranchFree(float t) {
  t = t == t ? t : 0.0f;  // NaN (its product stays NaN through x): no float → int conversion of NaN below
  t = t < -87.3f ? -87.3f : t;
  t = t > 88.7f ? 88.7f : t;
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding and subtracting it rounds to an integer (|t·log2e| < 2^22)
  const float n = (t * 1.44269504088896341f + kRound) - kRound;
  const float r = (t - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n in [−126, 128]: 2^n as two factors so that n = 128 (t near 88.7) stays finite in each
  const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
  const int32_t bits_a = (half + 127) << 23, bits_b = (ni - half + 127) << 23;
  float a, b;
  std::memcpy(&a, &bits_a, 4);
  std::memcpy(&b, &bits_b, 4);
  return p * a * b;
}

}  // namespace

QC_X86_CLONES void SiluMulRows(const float* z, int64_t rows, int64_t n, float* y) {
  const int64_t h = n / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = z + r * n;
    const float* u = g + h;
    float* out = y + r * h;
    for (int64_t j = 0; j < h; ++j) {
      const float x = g[j];
      out[j] = x / (1.0f + ExpBranchFree(-x)) * u[j];
    }
  }
}

}  // namespace Cpu
}  // namespace qcompiler
