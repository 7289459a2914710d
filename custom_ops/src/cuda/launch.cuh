// Kernel launch and device-side helpers, written once for nvcc and for the CPU emulation of the kernels
// (custom_ops/testing/emu, tests only).
// - QC_LAUNCH(kernel, grid, block, smem_bytes, stream, args...): a launch with `smem_bytes` of dynamic shared memory.
// - QC_DYNAMIC_SHARED(T, name): `T* name`, the block's dynamic shared memory (16-byte aligned). The emulation fills
//   it with 0xff bytes (fp16/fp32 NaN) before each block, so a read before a write shows in the result.
// - QC_DEVICE_CHECK(cond, what): an assumption the device code relies on (say, a vector load's alignment); the
//   emulation fails the launch with `what` when it does not hold, nvcc compiles it away.
#pragma once

#ifdef QCOMPILER_CUDA_EMU
#define QC_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::qcompiler::emu::Launch(kernel, grid, block, smem_bytes, stream, __VA_ARGS__)
#define QC_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::qcompiler::emu::DynamicShared())
#define QC_DEVICE_CHECK(cond, what)              \
  do {                                           \
    if (!(cond)) ::qcompiler::emu::Fail(what); \
  } while (0)
#else
#define QC_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#define QC_DYNAMIC_SHARED(T, name)                      \
  extern __shared__ __align__(16) unsigned char name##_bytes_[]; \
  T* name = reinterpret_cast<T*>(name##_bytes_)
#define QC_DEVICE_CHECK(cond, what) ((void)0)
#endif
