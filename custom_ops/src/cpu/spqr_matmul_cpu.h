// CPU (CPUExecutionProvider) kernels of qcompiler::SpQRMatMul.
#pragma once

#include "common/spqr_op.h"

namespace qcompiler {
namespace Cpu {

// Adds the CPU kernels (X float32 and X float16) to `domain`. The op objects are static: they outlive the domain.
void RegisterOps(Ort::CustomOpDomain& domain);

}  // namespace Cpu
}  // namespace qcompiler
