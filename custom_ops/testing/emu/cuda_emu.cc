// Fiber scheduler of the CUDA emulation (cuda_emu.h): one fiber per thread of the running block.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

// ------------------------------------------------------------------------------------ context switch
// x86-64: six callee-saved registers and the stack pointer (glibc's swapcontext also saves the signal mask, a
// system call per switch: the emulated kernels switch millions of times). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void qc_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl qc_emu_switch
  .hidden qc_emu_switch
  .type qc_emu_switch, @function
qc_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size qc_emu_switch, .-qc_emu_switch
)");

namespace qcompiler {
namespace emu {
namespace {
struct Context {
  void* sp = nullptr;
};
void Switch(Context& from, Context& to) { qc_emu_switch(&from.sp, to.sp); }
// `entry` starts on the top of [stack, stack + bytes) as if called (rsp = 8 mod 16); it must never return.
void MakeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  void** top = reinterpret_cast<void**>(stack + bytes);  // 16-aligned
  top[-1] = nullptr;                                  // entry's return address
  top[-2] = reinterpret_cast<void*>(entry);           // popped by qc_emu_switch's ret
  for (int i = 3; i <= 8; ++i) top[-i] = nullptr;     // rbp rbx r12 r13 r14 r15
  c.sp = top - 8;
}
}  // namespace
}  // namespace emu
}  // namespace qcompiler
#else
namespace qcompiler {
namespace emu {
namespace {
struct Context {
  ucontext_t uc;
};
void Switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
// getcontext returns once here: the context is replaced by makecontext before anything resumes it.
__attribute__((noinline)) void MakeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
}  // namespace
}  // namespace emu
}  // namespace qcompiler
#endif

namespace qcompiler {
namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kAtWarpCollective, kAtSyncThreads, kDone, kFailed };

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // kStackBytes after a guard page
  ThreadCoords coords;
  State state = State::kRunnable;
};

struct Warp {
  uint64_t slot[32];
  unsigned mask[32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Context scheduler;
  size_t current = 0;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_message;
unsigned g_seed = 1;
constexpr int kDefaultSmem = 48 * 1024, kOptinSmem = 99 * 1024, kSmemPerSm = 100 * 1024;
constexpr int kMultiprocessors = 16;  // as a Jetson AGX Orin (the launcher sizes some grids by it)
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::vector<unsigned char> g_dynamic_shared;

Fiber& Self() { return g_block->fibers[g_block->current]; }

void Park(State state) {  // back to the scheduler until released
  Fiber& f = Self();
  f.state = state;
  Switch(f.ctx, g_block->scheduler);
}

void FiberMain() {
  (*g_block->body)();
  Park(State::kDone);
}

char* MapStack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting the next stack
  return static_cast<char*>(p) + page;
}

void UnmapStack(char* stack) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  munmap(stack - page, kStackBytes + page);
}

// After every fiber ran until it parked: release a barrier, or say why none can be released ("" = all done).
std::string Release(Block& b) {
  bool released = false;
  const size_t n = b.fibers.size();
  for (size_t w = 0; w * 32 < n; ++w) {
    const size_t lo = w * 32, hi = std::min(n, lo + 32);
    size_t at = 0;
    for (size_t i = lo; i < hi; ++i) at += b.fibers[i].state == State::kAtWarpCollective;
    if (at == 0) continue;
    if (hi - lo != 32 || at != 32) {
      return "a warp collective reached by " + std::to_string(at) + " of the " + std::to_string(hi - lo) +
             " lanes of warp " + std::to_string(w) + " (the others returned or wait at __syncthreads)";
    }
    for (size_t i = lo; i < hi; ++i) {
      if (b.warps[w].mask[i - lo] != 0xffffffffu) return "a warp collective with a partial lane mask";
      b.fibers[i].state = State::kRunnable;
    }
    released = true;
  }
  if (released) return "";
  size_t at_sync = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_sync += f.state == State::kAtSyncThreads;
    done += f.state == State::kDone;
  }
  if (at_sync == 0) return "";
  if (done != 0) return "__syncthreads reached after " + std::to_string(done) + " threads of the block returned";
  for (Fiber& f : b.fibers) f.state = State::kRunnable;
  return "";
}

void StartFiber(Fiber& f, size_t t, dim3 block_idx, dim3 block, dim3 grid) {
  f.state = State::kRunnable;
  f.coords.thread_idx = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                             static_cast<unsigned>(t / (block.x * block.y)));
  f.coords.block_idx = block_idx;
  f.coords.block_dim = block;
  f.coords.grid_dim = grid;
  MakeContext(f.ctx, f.stack, kStackBytes, FiberMain);
}

bool RunBlock(Block& b, std::mt19937& rng) {
  std::vector<size_t> order(b.fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (size_t i : order) {
      if (b.fibers[i].state != State::kRunnable) continue;
      b.current = i;
      Switch(b.scheduler, b.fibers[i].ctx);
      ran = true;
      if (b.fibers[i].state == State::kFailed) return false;
    }
    if (!ran) {
      if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; })) {
        return true;
      }
      std::string why = Release(b);
      if (!why.empty()) {
        g_message = why;
        return false;
      }
      if (std::none_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::kRunnable; })) {
        g_message = "deadlock";
        return false;
      }
    }
  }
}

}  // namespace

const ThreadCoords& Current() { return Self().coords; }
unsigned& ScheduleSeed() { return g_seed; }
const char* LastErrorMessage() { return g_message.c_str(); }

void Fail(const char* what) {
  g_message = what;
  Park(State::kFailed);
  __builtin_unreachable();  // a failed fiber is never resumed
}

void SyncThreads() { Park(State::kAtSyncThreads); }

uint64_t WarpExchange(unsigned mask, uint64_t value, int src_lane) {
  const size_t i = g_block->current;
  Warp& w = g_block->warps[i / 32];
  w.slot[i % 32] = value;
  w.mask[i % 32] = mask;
  Park(State::kAtWarpCollective);  // every lane has written its value
  const uint64_t out = w.slot[src_lane];
  Park(State::kAtWarpCollective);  // every lane has read before any writes again
  return out;
}

void* DynamicShared() { return g_dynamic_shared.data(); }

void RunGrid(const void* func, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  const auto raised = g_max_dynamic_smem.find(func);
  const size_t smem_limit = raised == g_max_dynamic_smem.end() ? kDefaultSmem : raised->second;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || smem_bytes > smem_limit) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_message = smem_bytes > smem_limit ? "dynamic shared memory above the kernel's limit" : "invalid launch configuration";
    return;
  }
  Block b;
  b.fibers.resize(threads);
  b.warps.resize((threads + 31) / 32);
  b.body = &body;
  for (Fiber& f : b.fibers) f.stack = MapStack();
  std::mt19937 rng(g_seed);
  Block* outer = g_block;
  g_block = &b;
  bool ok = true;
  for (unsigned bz = 0; ok && bz < grid.z; ++bz)
    for (unsigned by = 0; ok && by < grid.y; ++by)
      for (unsigned bx = 0; ok && bx < grid.x; ++bx) {
        g_dynamic_shared.assign(std::max<size_t>(smem_bytes, 16), 0xff);
        for (size_t t = 0; t < threads; ++t) StartFiber(b.fibers[t], t, dim3(bx, by, bz), block, grid);
        ok = RunBlock(b, rng);
        if (!ok) {
          g_message = "block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " + std::to_string(bz) +
                      "): " + g_message;
        }
      }
  g_block = outer;
  for (Fiber& f : b.fibers) UnmapStack(f.stack);
  if (!ok) g_last_error = cudaErrorLaunchFailure;
}

}  // namespace emu
}  // namespace qcompiler

cudaError_t cudaGetLastError() {
  const cudaError_t e = qcompiler::emu::g_last_error;
  qcompiler::emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = qcompiler::emu::kMultiprocessors;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = qcompiler::emu::kOptinSmem;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = qcompiler::emu::kSmemPerSm;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaFuncSetAttributeBytes(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > qcompiler::emu::kOptinSmem) {
    return cudaErrorInvalidValue;
  }
  qcompiler::emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    default:
      return qcompiler::emu::g_message.c_str();
  }
}
