// The CPU kernels' entry points per instruction set: one table per ISA, filled once by that ISA's file, and the
// selector that picks a table for this CPU (and QCOMPILER_CPU_ISA, common/env_switches.h).
//
// Adding an ISA: one file that defines `const CpuKernels& <Isa>Kernels()` (the entries this build and CPU have,
// nullptr for the rest), one line in SelectCpuKernels (cpu_kernels.cc), one line in CMakeLists.txt. The op
// (spqr_matmul_cpu.cc) calls only what a table holds; with an empty table it runs the portable kernels
// (portable.cc), which every build has.
#pragma once

#include <cstdint>

#include "common/env_switches.h"
#include "cpu/gemv_avx512.h"
#include "cpu/packed.h"

namespace qcompiler {
namespace Cpu {

struct CpuKernels {
  const char* name = "portable";
  // Packed GEMV (pre-packed constant weights, decode sizes): X in slices of at most packed_max_rows rows, each by
  // packed_gemv(w, rows) (fp32 activations) or packed_gemv_int8(w, rows) (accuracy_level 4: int8 activations);
  // nullptr: no packed GEMV (packed_gemv) or no int8 one (packed_gemv_int8).
  int64_t packed_max_rows = 0;
  PackedGemvFn (*packed_gemv)(const PackedWeights& w, int64_t M) = nullptr;
  PackedGemvFn (*packed_gemv_int8)(const PackedWeights& w, int64_t M) = nullptr;
  // Whether packed_gemv_int8 reads 3-bit codes as PackedWeights::codes3 (3 bits a weight in memory; else nibbles).
  bool int8_codes3 = false;
  // Whether packed_gemv_int8 takes 8-bit codes (PackedWeights::bytes, slices of at most kPackedCodes8MaxRows rows),
  // and whether packed_gemv does (PackedWeights::codes, 4 codes a word); else 8-bit codes take the row kernels.
  bool int8_codes8 = false;
  bool fp32_codes8 = false;
  // X's preparation for packed_gemv_int8 (its int8 codes, scales and group sums), else PackedGemvInt8Inputs.
  PackedInt8InputsFn packed_int8_inputs = nullptr;
  // Whether slices of the packed GEMV also take M >= kGemmMinRows rows of X (else the portable GEMM does).
  bool packed_gemv_any_rows = false;
  // Packed prefill (GEMM, fp32 activations): the block decoder and the micro-kernels for 1..kGemmRowsMax rows of X.
  PackedDecodeFn (*packed_decode)(const PackedWeights& w) = nullptr;
  PackedMicroFn (*packed_micro)(int rows) = nullptr;
  // Helpers of the packed paths: outliers per row (else a portable dot per row), fp16 values to fp32 in bulk (else
  // one by one).
  PackedOutlierRowsFn outlier_rows = nullptr;
  HalvesToFloatsFn halves_to_floats = nullptr;
  // Row kernel of the unpacked GEMV on the stored layout (group_size % 16 == 0), for `bits` and M rows of X; nullptr
  // (or a nullptr result): the portable row kernel.
  GemvRowAvx512Fn (*gemv_row)(int64_t bits, int64_t M) = nullptr;
};

// One function per ISA file; each returns its table (entries this CPU lacks left nullptr).
const CpuKernels& PortableKernels();  // portable.cc: nothing beyond the portable kernels
const CpuKernels& Avx2Kernels();      // packed_avx2.cc
const CpuKernels& Avx512Kernels();    // packed_avx512.cc (with gemv_avx512.cc's row kernel)

// The table for `isa`: kAuto = the first ISA in SelectCpuKernels' list that this CPU has.
const CpuKernels& SelectCpuKernels(env::CpuIsa isa);

}  // namespace Cpu
}  // namespace qcompiler
