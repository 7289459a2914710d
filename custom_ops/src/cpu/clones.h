// QC_X86_CLONES: a function compiled three times — for the x86-64-v4 level (AVX-512 F/BW/CD/DQ/VL), x86-64-v3 (AVX2,
// FMA, F16C) and the baseline — with the CPU's best picked once at load time (GCC function multi-versioning, an
// ifunc that tests the ISA level's features; an `arch=<cpu>` clone would be taken only on that very CPU model). For loops the
// compiler vectorizes itself: the portable kernels, and the per-call work around the packed ones (X's conversion and
// int8 quantization, the activation epilogue); the hand-written kernels choose their ISA through cpu_kernels.h.
// Nothing elsewhere (aarch64, Clang, other systems).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define QC_X86_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QC_X86_CLONES
#endif
// Helpers of a cloned function: inlined into each clone, so that they are compiled for its ISA too (a call would
// reach the baseline build).
#define QC_CLONE_INLINE __attribute__((always_inline)) inline
