// SpQRMatMul CUDA prefill kernel (fp16 X, M >= kPrefillMinRows; docs/kernels.md) on tensor cores, and its launch.
#include "cuda/device_common.cuh"

#include <mma.h>

#include <algorithm>

namespace qcompiler {
namespace Cuda {
namespace {

// ---- prefill (fp16 X, M >= kPrefillMinRows): TM x TN output tiles on tensor cores ----
//
// Per 32-column chunk a block stages X's TM rows (in stored column order: the launcher permuted X's columns first)
// and W's TN rows decoded to fp16 in shared memory, then its WM x WN warps each accumulate a (TM / WM) x (TN / WN)
// part in fp32 (WMMA 16x16x16 fragments); the epilogue adds the bias and rounds to fp16 once, a fragment at a time
// through a small per-warp buffer. W is decoded once per TM rows of X: the first-level statistics of the chunk's (at
// most two) groups once per row, the codes four at a time (a thread per (row, quad): QuadFromWords on the two words
// that hold them, each code to fp32 by a byte permute and one FFMA), then the rows' outliers in the chunk added into
// the tile. X's rows load 16 bytes at a time where K allows (K % 8 == 0); its rows past M are never read into the
// stored outputs, so not staged. Two tiles (PrefillSmall, PrefillLarge; PrefillUsesLargeTile chooses): 64 x 64
// (4 warps) up to 64 rows of X, 128 x 128 (8 warps: W decoded once per 128 rows, 4x the multiply-adds per chunk for 2x
// the decode work) beyond, where its grid gives every SM a block.
constexpr int kTileK = spqr::kChunk, kTilePad = 8;

template <int BITS, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 512 / Tile::kThreads) SpQRMatMulPrefillKernel(
    const SpQRMatMulArgs a) {
  using namespace nvcuda;
  constexpr int kTileM = Tile::M, kTileN = Tile::N, kPrefillThreads = Tile::kThreads;
  constexpr int FM = Tile::kFragsM, FN = Tile::kFragsN, kWarps = Tile::kWarpsM * Tile::kWarpsN;
  __shared__ __align__(32) __half xs[kTileM][kTileK + kTilePad];
  __shared__ __align__(32) __half ws[kTileN][kTileK + kTilePad];
  __shared__ __align__(32) float out[kWarps][16][16 + 4];  // the epilogue's per-warp fragment buffer
  // per (row, group i of the chunk): w = s (q - z) as fmaf(256 s, c, -s (128 + z)) with c = CodeAsFloat = 1/2 + q/256
  // (the format allows fma(q, s, -s z); the rounding of -s (128 + z), ~1e-5 s, is far below fp16's)
  __shared__ float st_a[kTileN][2], st_b[kTileN][2];

  const __half* __restrict__ x = static_cast<const __half*>(a.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x >> 5, wm = warp / Tile::kWarpsN, wn = warp % Tile::kWarpsN;
  const int64_t row_bytes = spqr::PackedRowBytes(a.K, BITS);
  const int64_t chunks = (a.K + kTileK - 1) / kTileK;
  const int rows_m = static_cast<int>(min(static_cast<int64_t>(kTileM), a.M - m0));  // X's rows in the tile
  const bool x_vec = a.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.f);
  // thread t: the statistics of row st_r = t / 2 of the tile, group st_i = t % 2 of each chunk (rows past N: 0);
  // where that row's statistics live, computed once
  const int st_r = threadIdx.x >> 1, st_i = threadIdx.x & 1;
  const bool st_valid = n0 + st_r < a.N;
  const StatRow st_row = MakeStatRow(a, st_valid ? n0 + st_r : 0);
  const int64_t st_n2 = a.stat_bits ? Div(a.N + a.stat_group_size - 1, a.stat_group_size) : 0;
  const int64_t st_row_bytes = spqr::PackedRowBytes(a.N, a.stat_bits);
  // the thread's code quads: quad j = t % 8 of rows t / 8 + i * (threads / 8), i < kQuads, of each chunk; their rows'
  // packed codes (nullptr past N: weights 0)
  constexpr int kQuads = kTileN * 8 / kPrefillThreads;
  const uint8_t* wq[kQuads];
#pragma unroll
  for (int it = 0; it < kQuads; ++it) {
    const int64_t n = n0 + (threadIdx.x >> 3) + it * (kPrefillThreads / 8);
    wq[it] = n < a.N ? a.qweight + n * row_bytes : nullptr;
  }
  // thread t < kTileN: the CSR entries of row n0 + t not yet added, [op, op_end)
  int32_t op = 0, op_end = 0;
  if (a.row_ptr != nullptr && threadIdx.x < kTileN && n0 + threadIdx.x < a.N) {
    op = a.row_ptr[n0 + threadIdx.x];
    op_end = a.row_ptr[n0 + threadIdx.x + 1];
  }

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kTileK;
    // statistics of the chunk's groups: (row st_r, group k0 / gs + st_i)
    {
      const int64_t g = Div(k0, a.group_size) + st_i;
      float sv = 0.f, zv = 0.f;
      if (st_valid && g * a.group_size < a.K) GroupStatsAt(a, st_n2, st_row_bytes, g, st_row, sv, zv);
      st_a[st_r][st_i] = 256.f * sv;
      st_b[st_r][st_i] = -sv * (128.f + zv);
    }
    // X: 8 columns per step, (row r, columns 8v .. 8v+7) for e = 4r + v; rows past M are left as they are (they only
    // reach output rows past M, which are not stored)
    for (int e = threadIdx.x; e < rows_m * (kTileK / 8); e += kPrefillThreads) {
      const int r = e >> 2, v = e & 3;
      const int64_t k = k0 + 8 * v;
      __half* dst = &xs[r][8 * v];
      if (x_vec && k + 8 <= a.K) {
        const __half* src = x + (m0 + r) * a.K + k;
        QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0,
                        "X tile row not 16-byte aligned");
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int t = 0; t < 8; ++t) {  // (the ragged case: K % 8 != 0, or the last chunk)
          dst[t] = k + t < a.K ? x[(m0 + r) * a.K + k + t] : __float2half(0.f);
        }
      }
    }
    __syncthreads();
    // W: codes 4j .. 4j+3 of the thread's rows r; the chunk's second group (if any) starts at column `next`
    const bool tail = k0 + kTileK > a.K;
    const int tail_cols = static_cast<int>(a.K - k0);
    const int next = static_cast<int>(min(static_cast<int64_t>(kTileK),
                                          (Div(k0, a.group_size) + 1) * a.group_size - k0));
    const bool quad_groups = next % 4 == 0 && !tail;  // the common case: no quad straddles a group or K's end
#pragma unroll
    for (int it = 0; it < kQuads; ++it) {
      const int r = (threadIdx.x >> 3) + it * (kPrefillThreads / 8), j = threadIdx.x & 7;
      uint32_t lo = 0u, hi = 0u;
      if (wq[it] != nullptr) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(wq[it] + c * 4 * BITS);
        QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(w) % 4 == 0, "packed chunk not 4-byte aligned");
        lo = w[QuadLowWord(BITS, j)];
        if (BITS == 3) hi = w[2];
      }
      const uint32_t q = QuadFromWords(lo, hi, BITS, j);
      // (rows past N: statistics 0, so weights 0)
      uint32_t h[4];
      if (quad_groups) {  // the quad in one group and inside K: its (a, b) once
        const int i = 4 * j >= next;
        const float sa = st_a[r][i], sb = st_b[r][i];
#pragma unroll
        for (int b = 0; b < 4; ++b) h[b] = __half_as_ushort(__float2half(fmaf(sa, CodeAsFloat(q, b), sb)));
      } else {  // a group boundary inside the quad (β1 not a multiple of 4), or the last chunk
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int i = 4 * j + b >= next;
          float wv = fmaf(st_a[r][i], CodeAsFloat(q, b), st_b[r][i]);
          if (tail && 4 * j + b >= tail_cols) wv = 0.f;  // past K (the last chunk only)
          h[b] = __half_as_ushort(__float2half(wv));
        }
      }
      QC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(&ws[r][4 * j]) % 8 == 0, "W tile not 8-byte aligned");
      *reinterpret_cast<uint2*>(&ws[r][4 * j]) = make_uint2(h[0] | h[1] << 16, h[2] | h[3] << 16);
    }
    __syncthreads();
    // the tile rows' outliers in this chunk, a thread per row, each walking its row's entries once over all chunks
    // (columns strictly increase within a row: docs/spqr-format.md)
    for (; op < op_end; ++op) {
      const int j = a.col_idx[op] - static_cast<int>(k0);
      if (j >= kTileK) break;
      __half& t = ws[threadIdx.x][j];
      t = __float2half(__half2float(t) + Half(a.values[op]));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[FN];  // B[k][n] = ws[n][k]
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], &xs[(wm * FM + i) * 16][kk], kTileK + kTilePad);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], &ws[(wn * FN + j) * 16][kk], kTileK + kTilePad);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  // epilogue: each fragment through the warp's buffer, a lane per 8 of its 256 values (a lane's column is fixed)
  __half* __restrict__ y = static_cast<__half*>(a.y);
  const int lane = threadIdx.x & 31, ecol = lane & 15;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(&out[warp][0][0], acc[i][j], 16 + 4, wmma::mem_row_major);
      __syncwarp();
      const int64_t n = n0 + (wn * FN + j) * 16 + ecol;
      const float bias = n < a.N ? BiasOf(a, n) : 0.f;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int erow = (lane >> 4) + 2 * t;
        const int64_t m = m0 + (wm * FM + i) * 16 + erow;
        if (m < a.M && n < a.N) y[m * a.N + n] = __float2half_rn(out[warp][erow][ecol] + bias);
      }
      __syncwarp();  // the buffer is read before the next fragment overwrites it
    }
}

template <typename Tile>
void LaunchPrefillTile(const SpQRMatMulArgs& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.N + Tile::N - 1) / Tile::N),
                  static_cast<unsigned>((p.M + Tile::M - 1) / Tile::M));
  if (p.bits == 2) {
    QC_LAUNCH((SpQRMatMulPrefillKernel<2, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  } else if (p.bits == 3) {
    QC_LAUNCH((SpQRMatMulPrefillKernel<3, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  } else {
    QC_LAUNCH((SpQRMatMulPrefillKernel<4, Tile>), grid, dim3(Tile::kThreads), 0, s, p);
  }
}

// out[m, j] = x[m, perm[j]]: X's columns in stored order, once per call, so that the prefill kernel's blocks read
// contiguous rows instead of gathering single halves from all of X (every block of a column of tiles would repeat it)
__global__ void PermuteColumnsKernel(const __half* __restrict__ x, const int32_t* __restrict__ perm,
                                     __half* __restrict__ out, int64_t M, int64_t K) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < K;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[m * K + j] = x[m * K + perm[j]];
    }
  }
}

}  // namespace

int LaunchPrefill(const SpQRMatMulArgs& args, bool large_tile, cudaStream_t s) {
  SpQRMatMulArgs p = args;
  if (args.perm != nullptr) {
    if (args.scratch == nullptr) return static_cast<int>(cudaErrorInvalidValue);  // ScratchBytes was not honoured
    const dim3 pgrid(static_cast<unsigned>((args.K + 255) / 256),
                     static_cast<unsigned>(std::min<int64_t>(args.M, 65535)));
    QC_LAUNCH(PermuteColumnsKernel, pgrid, dim3(256), 0, s, static_cast<const __half*>(args.x), args.perm,
              static_cast<__half*>(args.scratch), args.M, args.K);
    p.x = args.scratch;
    p.perm = nullptr;  // X is in stored order now; outliers index stored columns anyway
  }
  if (large_tile) {
    LaunchPrefillTile<PrefillLarge>(p, s);
  } else {
    LaunchPrefillTile<PrefillSmall>(p, s);
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace Cuda
}  // namespace qcompiler
