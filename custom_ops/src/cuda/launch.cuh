// Kernel launch, written once for nvcc and for the CPU emulation of the kernels (custom_ops/emu, tests only).
#pragma once

#ifdef QCOMPILER_CUDA_EMU
#define QC_LAUNCH(kernel, grid, block, stream, ...) ::qcompiler::emu::Launch(kernel, grid, block, stream, __VA_ARGS__)
#else
#define QC_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif
