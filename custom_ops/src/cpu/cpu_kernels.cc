// SelectCpuKernels: the ISA tables, best first (cpu_kernels.h).
#include "cpu/cpu_kernels.h"

namespace qcompiler {
namespace Cpu {
namespace {

struct Isa {
  const CpuKernels& (*kernels)();
  bool (*available)();  // this build and CPU have the ISA's kernels
};

// Best first: QCOMPILER_CPU_ISA=auto takes the first one available.
const Isa kIsas[] = {
    {&Avx512Kernels, &PackedAvx512Available},
    {&Avx2Kernels, &PackedAvx2Available},
    {&PortableKernels, [] { return true; }},
};

// The AVX-512 row kernel on the stored layout without pre-packed weights (QCOMPILER_CPU_ISA=avx512-rows).
const CpuKernels& Avx512RowKernels() {
  static const CpuKernels k = [] {
    CpuKernels r;
    r.name = "avx512-rows";
    r.gemv_row = Avx512Kernels().gemv_row;
    return r;
  }();
  return k;
}

}  // namespace

const CpuKernels& SelectCpuKernels(env::CpuIsa isa) {
  switch (isa) {
    case env::CpuIsa::kPortable:
      return PortableKernels();
    case env::CpuIsa::kAvx512Rows:
      return Avx512RowKernels();
    case env::CpuIsa::kAvx2:
      return PackedAvx2Available() ? Avx2Kernels() : PortableKernels();
    case env::CpuIsa::kAuto:
      break;
  }
  for (const Isa& i : kIsas) {
    if (i.available()) return i.kernels();
  }
  return PortableKernels();
}

}  // namespace Cpu
}  // namespace qcompiler
