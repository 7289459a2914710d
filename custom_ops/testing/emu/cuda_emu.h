// CPU emulation of the CUDA features that SpQRMatMul's kernels use, so that their logic runs and is tested where no
// GPU is (tests/test_cuda_emu.py, the emulated cases of tests/test_fuzz_spqr_matmul.py). Test-only: never linked into libqcompiler_ops.so.
//
// The .cu files are compiled unchanged by the host C++ compiler with custom_ops/testing/emu/include first on the include path
// (its cuda_fp16.h / cuda_runtime.h / mma.h stubs include this header) and QCOMPILER_CUDA_EMU defined (the launch goes
// through QC_LAUNCH, cuda/launch.cuh).
//
// Model: a grid's blocks run one after another; a block's threads are fibers on one OS thread that switch only at
// __syncthreads and at warp collectives (__shfl_xor_sync), in a freshly shuffled order at every step, so that a read
// of shared memory written by another thread without a barrier between sees a different value from run to run.
// Checked and reported as a launch error (cudaGetLastError): a __syncthreads reached after some threads of the block
// returned, a warp collective that not all 32 lanes reach, a partial shuffle mask, a deadlock, WMMA pointers not 32-byte
// aligned or strides not a multiple of 16 bytes, a launch with more than 1024 threads per block, dynamic shared
// memory above 48 KB (or above the kernel's cudaFuncSetAttribute limit). Dynamic shared memory starts as 0xff bytes
// in every block. Not modelled: memory ordering between blocks, timing, the static `__shared__` arrays' share of
// the shared-memory limit, register spills, uninitialized static shared memory (`__shared__` arrays are function
// statics here: zero at the first block, then the last block's values).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------------------------------------------- runtime
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719
};
cudaError_t cudaGetLastError();  // returns and clears the emulator's last launch error
const char* cudaGetErrorString(cudaError_t error);
// The emulated device: one device (0), sm_86-like shared memory: 48 KB per block by default, 99 KB opt-in, 100 KB
// per SM.
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttributeBytes(const void* func, cudaFuncAttribute attr, int value);
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttributeBytes(reinterpret_cast<const void*>(func), attr, value);
}

namespace qcompiler {
namespace emu {

struct ThreadCoords {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadCoords& Current();  // of the running fiber

// Runs `body` for every thread of every block (see the model above) with `smem_bytes` of dynamic shared memory
// (refused above 48 KB unless cudaFuncSetAttribute raised `func`'s limit); a failure is kept for cudaGetLastError.
void RunGrid(const void* func, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
void* DynamicShared();  // of the running block

// Warp collectives: the calling lane's value in, lane `src`'s value out. Fails unless all 32 lanes take part.
uint64_t WarpExchange(unsigned mask, uint64_t value, int src_lane);
void SyncThreads();
[[noreturn]] void Fail(const char* what);  // ends the launch with cudaErrorLaunchFailure and this message
const char* LastErrorMessage();            // of the last failed launch ("" if none)
unsigned& ScheduleSeed();                  // seed of the fiber order shuffles

template <class... P, class... A>
void Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, const A&... args) {
  RunGrid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, [&] { kernel(args...); });
}

}  // namespace emu
}  // namespace qcompiler

#define threadIdx (::qcompiler::emu::Current().thread_idx)
#define blockIdx (::qcompiler::emu::Current().block_idx)
#define blockDim (::qcompiler::emu::Current().block_dim)
#define gridDim (::qcompiler::emu::Current().grid_dim)

inline void __syncthreads() { ::qcompiler::emu::SyncThreads(); }

// A warp barrier: the 32 lanes (full mask only, as the shuffles) meet before any goes on.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const int lane = static_cast<int>(::qcompiler::emu::Current().thread_idx.x & 31u);
  (void)::qcompiler::emu::WarpExchange(mask, 0, lane);
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (width != 32) ::qcompiler::emu::Fail("__shfl_xor_sync: only width 32 is emulated");
  uint64_t in = 0;
  std::memcpy(&in, &var, sizeof(T));
  const int lane = static_cast<int>(::qcompiler::emu::Current().thread_idx.x & 31u);
  const uint64_t out = ::qcompiler::emu::WarpExchange(mask, in, lane ^ (lane_mask & 31));
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ------------------------------------------------------------------------------------------- vector types, bits
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
// PTX prmt (default mode): byte k of the result is byte (s >> 4k) & 7 of the 8 bytes {x, y}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t b = static_cast<uint64_t>(y) << 32 | x;
  unsigned r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<unsigned>((b >> (8 * ((s >> (4 * k)) & 7u))) & 0xffu) << (8 * k);
  return r;
}
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  std::memcpy(&v, &f, 4);
  return v;
}

// ---------------------------------------------------------------------------------------------------------- fp16
struct __half {
  uint16_t bits_;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits_; }
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits_, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {  // round to nearest even, as the hardware
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits_, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }

// ---------------------------------------------------------------------------------------------------------- WMMA
// Each lane owns the accumulator elements e = lane + 32 t (of M * N, row-major) and loads, computes and stores only
// what they need, so a lane that skips a collective leaves its part of the result unwritten.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct FragmentShape;
template <int M, int N, int K>
struct FragmentShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct FragmentShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct FragmentShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = FragmentShape<Use, M, N, K>::rows, cols = FragmentShape<Use, M, N, K>::cols;
  float v[rows][cols];  // fp16 tiles are held exactly as fp32
};

namespace detail {
inline float ToFloat(float x) { return x; }
inline float ToFloat(__half x) { return __half2float(x); }
inline void CheckPointer(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::qcompiler::emu::Fail(what);
  if ((ldm * elem_bytes) % 16 != 0) ::qcompiler::emu::Fail(what);
}
inline int Lane() { return static_cast<int>(::qcompiler::emu::Current().thread_idx.x & 31u); }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V value) {
  for (auto& row : f.v)
    for (float& e : row) e = detail::ToFloat(value);
}

// Element (r, c) of the tile at `p` with stride `ldm`, row- or column-major. A lane loads only what its accumulator
// elements (e = lane + 32 t: row e / N, column e % N) need: those rows of A, those columns of B.
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  detail::CheckPointer(p, ldm, sizeof(T), "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a multiple "
                                          "of 16 bytes");
  constexpr bool kIsA = std::is_same<Use, matrix_a>::value, kIsB = std::is_same<Use, matrix_b>::value;
  using F = fragment<Use, M, N, K, T, L>;
  auto load = [&](int r, int c) {
    f.v[r][c] = detail::ToFloat(std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
  };
  for (int e = detail::Lane(); e < M * N; e += 32) {
    if (kIsA) {
      for (int c = 0; c < F::cols; ++c) load(e / N, c);
    } else if (kIsB) {
      for (int r = 0; r < F::rows; ++r) load(r, e % N);
    } else {
      load(e / N, e % N);
    }
  }
}

template <int M, int N, int K, class TA, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  for (int e = detail::Lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    float acc = c.v[i][j];
    for (int k = 0; k < K; ++k) acc = __builtin_fmaf(a.v[i][k], b.v[k][j], acc);
    d.v[i][j] = acc;
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::CheckPointer(p, ldm, sizeof(float), "wmma::store_matrix_sync: pointer not 32-byte aligned or ldm not a "
                                              "multiple of 16 bytes");
  for (int e = detail::Lane(); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = f.v[i][j];
  }
}
}  // namespace wmma
}  // namespace nvcuda
