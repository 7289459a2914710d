// The environment variables the kernels read, all of them, in one place. They are for tests and A/B timing only;
// unset, every kernel takes its own best choice.
//
// | variable                      | values                            | meaning                                        |
// |-------------------------------|-----------------------------------|------------------------------------------------|
// | QCOMPILER_CPU_ISA             | auto (default), avx2,             | the CPU kernels' instruction set (cpu/cpu_kernels.h): |
// |                               | avx512-rows, portable             | auto = the best this CPU has; avx2 = no AVX-512 code; |
// |                               |                                   | avx512-rows = AVX-512 without pre-packed weights; |
// |                               |                                   | portable = no packing, no AVX-512 code.       |
// |                               |                                   | Other values: auto.                            |
// | QCOMPILER_CPU_REQUIRE_PACKED  | 1, else off (default)             | a CPU call that takes no packed path fails     |
// | QCOMPILER_CPU_REQUIRE_KEPT_BINDING | 1, else off (default)        | a CPU call after a node's first, all its inputs |
// |                               |                                   | but X initializers, fails unless it takes the  |
// |                               |                                   | kept binding (SpQRMatMulCpuKernel::Bind)       |
// | QCOMPILER_CPU_KEEP_PAGES      | 1, else off (default)             | the stored weights stay resident after packing |
// |                               |                                   | (default: released, cpu/packed.h ReleasePages) |
// | QCOMPILER_CUDA_GEMV_X         | resident, slabs, rows; else the   | the decode GEMV's X staging, where it fits     |
// |                               | launcher's choice (default)       |                                                |
// | QCOMPILER_CUDA_GEMV_ROWS      | 1, 2, 4; else the cost model's    | the decode GEMV's rows per warp, where its tile |
// |                               | choice (default)                  | offers that count                              |
// | QCOMPILER_CUDA_PREFILL_TILE   | 64, 128; else the launcher's      | the tensor-core prefill kernel's tile          |
// |                               | choice (default)                  |                                                |
//
// When they are read: once per kernel object, that is when an ONNX Runtime session creates the node's kernel (the
// CPU kernel in its constructor, the CUDA kernel likewise, handing the switches to every launch); never per call.
// The library-free test entries (custom_ops/testing/: the emulation and the direct GPU runs, which have no kernel
// object) read them once per entry call. Plain C++ (no ORT, no CUDA headers): nvcc and the emulation include it too.
#pragma once

namespace qcompiler {
namespace env {

// QCOMPILER_CPU_ISA
enum class CpuIsa { kAuto, kAvx2, kAvx512Rows, kPortable };

struct CpuSwitches {
  CpuIsa isa = CpuIsa::kAuto;
  bool require_packed = false;  // QCOMPILER_CPU_REQUIRE_PACKED=1
  bool require_kept_binding = false;  // QCOMPILER_CPU_REQUIRE_KEPT_BINDING=1
  bool keep_pages = false;      // QCOMPILER_CPU_KEEP_PAGES=1
};

// QCOMPILER_CUDA_GEMV_X (kAuto: the launcher's choice)
enum class GemvX { kAuto, kResident, kSlabs, kRows };

struct CudaSwitches {
  GemvX gemv_x = GemvX::kAuto;
  int gemv_rows = 0;     // QCOMPILER_CUDA_GEMV_ROWS: 1, 2 or 4; 0 = the cost model's choice
  int prefill_tile = 0;  // QCOMPILER_CUDA_PREFILL_TILE: 64 or 128; 0 = the launcher's choice
};

// The switches as the environment sets them now (each call reads the environment: keep the result).
CpuSwitches ReadCpuSwitches();
CudaSwitches ReadCudaSwitches();

}  // namespace env
}  // namespace qcompiler
