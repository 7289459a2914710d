// Kernel launch and device-side checks, written once for nvcc and for the CPU emulation of the kernels
// (custom_ops/emu, tests only). QC_DEVICE_CHECK(cond, what): an assumption the device code relies on (say, a vector
// load's alignment); the emulation fails the launch with `what` when it does not hold, nvcc compiles it away.
#pragma once

#ifdef QCOMPILER_CUDA_EMU
#define QC_LAUNCH(kernel, grid, block, stream, ...) ::qcompiler::emu::Launch(kernel, grid, block, stream, __VA_ARGS__)
#define QC_DEVICE_CHECK(cond, what) \
  do {                              \
    if (!(cond)) ::qcompiler::emu::Fail(what); \
  } while (0)
#else
#define QC_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define QC_DEVICE_CHECK(cond, what) ((void)0)
#endif
