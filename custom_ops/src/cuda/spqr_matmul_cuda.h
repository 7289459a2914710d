// CUDA (CUDAExecutionProvider) kernels of qcompiler::SpQRMatMul. Without CUDA (QCOMPILER_WITH_CUDA undefined)
// RegisterOps is an empty inline stub, so the registration file needs no #ifdef.
#pragma once

#include "common/spqr_op.h"

namespace qcompiler {
namespace Cuda {

#ifdef QCOMPILER_WITH_CUDA
// Adds the CUDA kernels (X float32 and X float16) to `domain`.
void RegisterOps(Ort::CustomOpDomain& domain);
#else
inline void RegisterOps(Ort::CustomOpDomain& /*domain*/) {}
#endif

}  // namespace Cuda
}  // namespace qcompiler
