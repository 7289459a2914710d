// Parsing of the environment switches (the table is in env_switches.h).
#include "common/env_switches.h"

#include <cstdlib>
#include <cstring>

namespace qcompiler {
namespace env {
namespace {

// The variable's value, or "" when unset.
const char* Get(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

bool Is(const char* value, const char* expected) { return std::strcmp(value, expected) == 0; }

}  // namespace

CpuSwitches ReadCpuSwitches() {
  CpuSwitches s;
  const char* isa = Get("QCOMPILER_CPU_ISA");
  s.isa = Is(isa, "avx2")          ? CpuIsa::kAvx2
          : Is(isa, "avx512-rows") ? CpuIsa::kAvx512Rows
          : Is(isa, "portable")    ? CpuIsa::kPortable
                                   : CpuIsa::kAuto;
  s.require_packed = Is(Get("QCOMPILER_CPU_REQUIRE_PACKED"), "1");
  s.require_kept_binding = Is(Get("QCOMPILER_CPU_REQUIRE_KEPT_BINDING"), "1");
  s.keep_pages = Is(Get("QCOMPILER_CPU_KEEP_PAGES"), "1");
  return s;
}

CudaSwitches ReadCudaSwitches() {
  CudaSwitches s;
  const char* x = Get("QCOMPILER_CUDA_GEMV_X");
  s.gemv_x = Is(x, "resident") ? GemvX::kResident : Is(x, "slabs") ? GemvX::kSlabs : Is(x, "rows") ? GemvX::kRows
                                                                                                 : GemvX::kAuto;
  const int rows = std::atoi(Get("QCOMPILER_CUDA_GEMV_ROWS"));
  s.gemv_rows = rows == 1 || rows == 2 || rows == 4 ? rows : 0;
  const char* tile = Get("QCOMPILER_CUDA_PREFILL_TILE");
  s.prefill_tile = Is(tile, "64") ? 64 : Is(tile, "128") ? 128 : 0;
  return s;
}

}  // namespace env
}  // namespace qcompiler
