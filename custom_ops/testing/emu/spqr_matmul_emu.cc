// C entry points of the emulated SpQRMatMul CUDA kernel (libqcompiler_cuda_emu.so, loaded by ctypes in
// tests/cuda_emu.py): buffers with a guard page after them, and the launcher of custom_ops/src/cuda/launcher.cu with
// its arguments spelled out (the QCOMPILER_CUDA_* switches read at each call).
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "common/env_switches.h"
#include "cuda/spqr_matmul_cuda_impl.cuh"
#include "cuda_emu.h"
#include "spqr_matmul_c_args.h"

namespace {
size_t PageBytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
size_t MappedBytes(size_t bytes) {  // 256-byte aligned start (as cudaMalloc), then a PROT_NONE page
  const size_t page = PageBytes(), used = (bytes + 255) / 256 * 256;
  return (used + page - 1) / page * page + page;
}
}  // namespace

extern "C" {

// `bytes` bytes starting 256-aligned, ending less than 256 bytes before an unreadable page; the slack is filled with
// 0xff bytes (fp16 NaN), so a read past the end gives NaN outputs or faults. nullptr on failure.
__attribute__((visibility("default"))) void* qc_emu_alloc(size_t bytes) {
  const size_t total = MappedBytes(bytes), page = PageBytes();
  char* p = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) return nullptr;
  mprotect(p + total - page, page, PROT_NONE);
  const size_t used = (bytes + 255) / 256 * 256;
  char* start = p + (total - page - used);
  std::memset(start, 0xff, used);
  return start;
}

__attribute__((visibility("default"))) void qc_emu_free(void* start, size_t bytes) {
  if (start == nullptr) return;
  const size_t total = MappedBytes(bytes), page = PageBytes(), used = (bytes + 255) / 256 * 256;
  munmap(static_cast<char*>(start) - (total - page - used), total);
}

// Runs LaunchSpQRMatMul with the fiber order drawn from `seed`. Returns the cudaError_t value; `message` receives the
// emulator's reason for a failed launch.
__attribute__((visibility("default"))) int qc_emu_spqr_matmul(
    int64_t M, int64_t K, int64_t N, int bits, int64_t group_size, int stat_bits, int64_t stat_group_size,
    const void* x, int x_is_half, const uint8_t* qweight, const void* scales, const void* zeros,
    const uint16_t* stats2, const int32_t* row_ptr, const uint16_t* col_idx, const uint16_t* values,
    const int32_t* perm, const void* bias, int bias_is_half, int activation, void* y, unsigned seed, char* message,
    size_t message_bytes) {
  qcompiler::Cuda::SpQRMatMulArgs a =
      qcompiler::Cuda::MakeArgs(M, K, N, bits, group_size, stat_bits, stat_group_size, x, x_is_half, qweight, scales,
                                zeros, stats2, row_ptr, col_idx, values, perm, bias, bias_is_half, activation, y);
  qcompiler::emu::ScheduleSeed() = seed;
  const size_t scratch_bytes = qcompiler::Cuda::ScratchBytes(a);
  a.scratch = scratch_bytes ? qc_emu_alloc(scratch_bytes) : nullptr;  // as ORT's allocator would, after the output
  const int err = qcompiler::Cuda::LaunchSpQRMatMul(a, qcompiler::env::ReadCudaSwitches(), nullptr);
  qc_emu_free(a.scratch, scratch_bytes);
  if (message != nullptr && message_bytes > 0) {
    std::strncpy(message, err ? qcompiler::emu::LastErrorMessage() : "", message_bytes - 1);
    message[message_bytes - 1] = '\0';
  }
  return err;
}

}  // extern "C"
