// QC_X86_CLONES: a function compiled three times — for AVX-512 (Skylake-SP's set), AVX2 + FMA (Haswell's) and the
// baseline — with the CPU's best picked once at load time (GCC/Clang function multi-versioning, an ifunc). For the
// small per-call loops around the kernels (X's conversion and quantization) that the compiler vectorizes itself;
// the kernels proper choose their ISA through cpu_kernels.h. Nothing elsewhere (aarch64, other compilers).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define QC_X86_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define QC_X86_CLONES
#endif
// Helpers of a cloned function: inlined into each clone, so that they are compiled for its ISA too (a call would
// reach the baseline build).
#define QC_CLONE_INLINE __attribute__((always_inline)) inline
