// CPU kernel of qcompiler::SpQRMatMul: Y[m, n] = sum_k X[m, k] * W[n, k] + bias[n], W decoded on the fly.
//
// The op binds and checks the inputs, then picks a path and runs it over ORT's intra-op thread pool: the packed
// prefill GEMM or the packed GEMV (pre-packed constant weights, packed.h; drivers in packed_tasks.cc) where the
// kernel's ISA table (cpu_kernels.h, chosen once per kernel) has them, else the portable paths (portable.cc). X is
// converted to fp32 and permuted once per call (Xp[m, j] = X[m, perm[j]]), so the permutation costs nothing inside
// the loops. No dense copy of W is kept between calls.
#include "cpu/spqr_matmul_cpu.h"

#include "common/env_switches.h"
#include "cpu/activation.h"
#include "cpu/cpu_job.h"
#include "cpu/cpu_kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace qcompiler {
namespace Cpu {
namespace {

using spqr::Attributes;
using spqr::BoundInputs;

// O(N + nnz + K) checks of index inputs that the decode loop trusts (out-of-range indices would read out of bounds).
void CheckIndices(const BoundInputs& b, const Attributes& a, const std::string& prefix) {
  if (b.in[spqr::kRowPtr].present()) {
    const int32_t* rp = b.in[spqr::kRowPtr].as<int32_t>();
    for (int64_t n = 0; n < a.N; ++n) {
      if (rp[n + 1] < rp[n]) {
        throw Ort::Exception(prefix + "outlier_row_ptr must be non-decreasing (row " + std::to_string(n) + ")",
                             ORT_INVALID_ARGUMENT);
      }
    }
    const uint16_t* ci = b.in[spqr::kColIdx].as<uint16_t>();
    for (int64_t p = 0; p < b.nnz; ++p) {
      if (ci[p] >= a.K) {
        throw Ort::Exception(prefix + "outlier_col_idx[" + std::to_string(p) + "]=" + std::to_string(ci[p]) +
                                 " is out of range for K=" + std::to_string(a.K),
                             ORT_INVALID_ARGUMENT);
      }
    }
  }
  if (b.in[spqr::kPerm].present()) {
    const int32_t* perm = b.in[spqr::kPerm].as<int32_t>();
    std::vector<char> seen(static_cast<size_t>(a.K), 0);
    for (int64_t k = 0; k < a.K; ++k) {
      if (perm[k] < 0 || perm[k] >= a.K) {
        throw Ort::Exception(prefix + "perm[" + std::to_string(k) + "]=" + std::to_string(perm[k]) +
                                 " is out of range for K=" + std::to_string(a.K),
                             ORT_INVALID_ARGUMENT);
      }
      if (seen[perm[k]]++) {
        throw Ort::Exception(prefix + "perm is not a permutation: " + std::to_string(perm[k]) + " appears twice (perm[" +
                                 std::to_string(k) + "])",
                             ORT_INVALID_ARGUMENT);
      }
    }
  }
}

size_t ElementBytes(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return 4;
    default:
      return 0;  // nothing released
  }
}

// Y = act(Z) for the `activation` attribute: rows of Z [M, N] → rows of Y [M, N/2], kActivationRows rows per task
// (fp16 rows through an fp32 row buffer).
constexpr int64_t kActivationRows = 16;
struct ActivationJob {
  int64_t N;
  const float* z_f32;
  const uint16_t* z_f16;
  float* y_f32;
  uint16_t* y_f16;
  int64_t M;
};
void ActivationTask(void* data, size_t task) {
  const ActivationJob& j = *static_cast<const ActivationJob*>(data);
  const int64_t begin = static_cast<int64_t>(task) * kActivationRows, end = std::min(j.M, begin + kActivationRows);
  const int64_t h = j.N / 2;
  if (j.z_f32 != nullptr) {
    SiluMulRows(j.z_f32 + begin * j.N, end - begin, j.N, j.y_f32 + begin * h);
    return;
  }
  thread_local std::vector<float> z, y;
  z.resize(static_cast<size_t>(j.N));
  y.resize(static_cast<size_t>(h));
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t n = 0; n < j.N; ++n) z[n] = spqr::HalfBitsToFloat(j.z_f16[m * j.N + n]);
    SiluMulRows(z.data(), 1, j.N, y.data());
    for (int64_t n = 0; n < h; ++n) j.y_f16[m * h + n] = Ort::Float16_t(y[n]).val;
  }
}

struct SpQRMatMulCpuKernel : spqr::KernelBase<SpQRMatMulCpuKernel> {
  SpQRMatMulCpuKernel(const OrtKernelInfo* info, ONNXTensorElementDataType x_type)
      : prefix_(spqr::ErrorPrefix(info)), attrs_(spqr::ReadAttributes(info, prefix_)), x_type_(x_type) {
    // The environment switches (common/env_switches.h), read once here: QCOMPILER_CPU_ISA picks the ISA table,
    // QCOMPILER_CPU_REQUIRE_PACKED=1 makes a call fail unless it takes a packed path, and
    // QCOMPILER_CPU_REQUIRE_KEPT_BINDING=1 unless it takes the kept binding where it should (tests).
    const env::CpuSwitches switches = env::ReadCpuSwitches();
    isa_ = &SelectCpuKernels(switches.isa);
    require_packed_ = switches.require_packed;
    require_kept_binding_ = switches.require_kept_binding;
    release_pages_ = !switches.keep_pages;
    Ort::ConstKernelInfo ki(info);
    for (size_t i = 1; i < spqr::kNumInputs; ++i) {
      int is_constant = 0;
      try {
        ki.GetTensorConstantInput(i, &is_constant);
      } catch (const Ort::Exception&) {
        is_constant = 0;  // omitted optional input (or an ORT without the query): treated as fed at run time
      }
      constant_[i] = is_constant != 0;
    }
    // The packed decode path needs the weight tensors to be initializers (packed once, reused every call).
    // accuracy_level 4: int8 activations where the table has a packed int8 kernel (AVX512-VNNI; AVX2 on CPUs
    // without AVX-512), else fp32 as level 0 (AVX-512 without VNNI, portable builds). 8-bit codes: packed only on
    // the ISA tables that have kernels for them (int8_codes8, fp32_codes8), else the row kernels on the stored layout.
    const bool int8_kernel = attrs_.accuracy_level == 4 && isa_->packed_gemv_int8 != nullptr;
    const bool codes8 = PackableCodes8(attrs_) && (int8_kernel ? isa_->int8_codes8 : isa_->fp32_codes8);
    allow_packed_ = isa_->packed_gemv != nullptr && (Packable(attrs_) || codes8) &&
                    constant_[spqr::kQWeight] && constant_[spqr::kScales] && constant_[spqr::kZeros] &&
                    (attrs_.stat_bits == 0 || constant_[spqr::kStats2]);
    int8_ = allow_packed_ && int8_kernel;
    int8_inputs_ = isa_->packed_int8_inputs != nullptr ? isa_->packed_int8_inputs : &PackedGemvInt8Inputs;
  }

  // The packed weights, built on the first call that takes a packed path from that call's (constant) inputs; the
  // stored tensors they replace are then released from the resident set (ReleasePages: the session keeps one copy
  // of each weight resident, not two).
  const PackedWeights& Packed(const BoundInputs& b) {
    std::call_once(pack_once_, [&] {
      packed_ = std::make_unique<PackedWeights>(
          Pack(attrs_, b.in[spqr::kQWeight].as<uint8_t>(), b.in[spqr::kScales].data, b.in[spqr::kZeros].data,
               b.in[spqr::kStats2].present() ? b.in[spqr::kStats2].as<uint16_t>() : nullptr, int8_,
               isa_->int8_codes3));
      if (release_pages_) {
        for (size_t i : {spqr::kQWeight, spqr::kScales, spqr::kZeros, spqr::kStats2}) {
          const spqr::TensorArg& t = b.in[i];
          const bool halved = i != spqr::kQWeight && i != spqr::kStats2 && t.data == halved_[i - spqr::kScales].data();
          if (t.present() && !halved) ReleasePages(t.data, static_cast<size_t>(t.numel()) * ElementBytes(t.type));
        }
      }
    });
    return *packed_;
  }

  // float32 scales/zeros (stat_bits 0) → fp16, which every path below reads: once per session for initializers,
  // into `local` for inputs fed at run time.
  void HalveStats(BoundInputs& b, std::array<std::vector<uint16_t>, 2>& local) {
    for (size_t j = 0; j < 2; ++j) {
      spqr::TensorArg& t = b.in[j == 0 ? spqr::kScales : spqr::kZeros];
      if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) continue;
      const bool constant = constant_[j == 0 ? spqr::kScales : spqr::kZeros];
      auto convert = [&](std::vector<uint16_t>& out) {
        const float* src = t.as<float>();
        out.resize(static_cast<size_t>(t.numel()));
        for (size_t k = 0; k < out.size(); ++k) out[k] = Ort::Float16_t(src[k]).val;
      };
      if (constant) {
        std::call_once(halved_once_[j], [&] { convert(halved_[j]); });
        t.data = halved_[j].data();
      } else {
        convert(local[j]);
        t.data = local[j].data();
      }
      t.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    }
  }

  // The inputs of this call into `b`. When every input but X is an initializer (what exports write), the first call
  // binds and checks them all (spqr::BindInputs) and keeps that binding; later calls take it (after checking that
  // ORT hands over the same tensors) and bind only X, without the per-input shape queries and their allocations (a
  // fixed cost per call that showed on small nodes). Anything unexpected takes the full binding, whose checks give
  // the error messages.
  void Bind(OrtKernelContext* context, BoundInputs& b) {
    const OrtApi& api = Ort::GetApi();
    const bool ready = bound_ready_.load(std::memory_order_acquire);
    if (ready && BindX(context, b)) return;
    if (ready && require_kept_binding_) {
      throw Ort::Exception(prefix_ + "QCOMPILER_CPU_REQUIRE_KEPT_BINDING=1 but this call did not take the kept binding",
                           ORT_FAIL);
    }
    b = spqr::BindInputs(context, attrs_, x_type_, prefix_, /*host_data=*/true);
    bool cacheable = true;
    for (size_t i = 1; i < spqr::kNumInputs; ++i) cacheable &= !b.in[i].present() || constant_[i];
    if (!cacheable) return;
    std::call_once(bound_once_, [&] {
      bound_ = b;
      size_t count = 0;
      Ort::ThrowOnError(api.KernelContext_GetInputCount(context, &count));
      bound_count_ = count;
      bound_ready_.store(true, std::memory_order_release);
    });
  }

  // The fast binding (Bind): false when any constant input differs from the kept binding or X is not as expected.
  // The constant inputs are compared by their data: ONNX Runtime hands over a fresh OrtValue wrapping the same
  // initializer tensor in every run (the run's execution frame holds its own copies), so the OrtValue pointers
  // differ from run to run while the tensors' buffers do not.
  bool BindX(OrtKernelContext* context, BoundInputs& b) {
    const OrtApi& api = Ort::GetApi();
    size_t count = 0;
    Ort::ThrowOnError(api.KernelContext_GetInputCount(context, &count));
    if (count != bound_count_) return false;
    for (size_t i = 1; i < spqr::kNumInputs; ++i) {  // the constant inputs: this call's values, the kept rest
      const spqr::TensorArg& src = bound_.in[i];
      spqr::TensorArg& dst = b.in[i];
      const OrtValue* v = nullptr;
      if (i < count) Ort::ThrowOnError(api.KernelContext_GetInput(context, i, &v));
      if ((v == nullptr) != (src.value == nullptr)) return false;
      if (v != nullptr && Ort::ConstValue(v).GetTensorRawData() != src.data) return false;
      dst.value = v;
      dst.type = src.type;
      dst.data = src.data;
      dst.shape.assign(src.shape.begin(), src.shape.end());  // in place: the thread's vectors keep their capacity
    }
    const OrtValue* xv = nullptr;
    Ort::ThrowOnError(api.KernelContext_GetInput(context, spqr::kX, &xv));
    if (xv == nullptr) return false;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    Ort::ThrowOnError(api.GetTensorTypeAndShape(xv, &info));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t rank = 0;
    OrtStatus* st = api.GetTensorElementType(info, &type);
    if (st == nullptr) st = api.GetDimensionsCount(info, &rank);
    spqr::TensorArg& x = b.in[spqr::kX];
    if (st == nullptr) {
      x.shape.resize(rank);
      st = api.GetDimensions(info, x.shape.data(), rank);
    }
    api.ReleaseTensorTypeAndShapeInfo(info);
    if (st != nullptr) {
      api.ReleaseStatus(st);
      return false;
    }
    const Attributes& a = attrs_;
    if (type != x_type_ || rank == 0 || x.shape.back() != a.K) return false;
    int64_t numel = 1;
    for (int64_t d : x.shape) numel *= d;
    const int64_t M = numel / a.K;
    if (M > 0 && a.N > std::numeric_limits<int64_t>::max() / M) return false;
    x.value = xv;
    x.type = type;
    x.data = Ort::ConstValue(xv).GetTensorRawData();
    b.M = M;
    b.nnz = bound_.nnz;
    b.y_shape.assign(x.shape.begin(), x.shape.end());
    b.y_shape.back() = a.out_cols();
    return true;
  }

  void Compute(OrtKernelContext* context) {
    const Attributes& a = attrs_;
    thread_local BoundInputs b;  // per thread, its vectors reused call after call
    Bind(context, b);
    std::array<std::vector<uint16_t>, 2> halved_local;
    if (a.stat_bits == 0) HalveStats(b, halved_local);
    // Index inputs that are initializers are checked on the first call only; inputs fed at run time every call.
    bool per_call = false;
    for (size_t i : {spqr::kRowPtr, spqr::kColIdx, spqr::kPerm}) per_call |= b.in[i].present() && !constant_[i];
    if (per_call || !indices_checked_.load(std::memory_order_acquire)) {
      CheckIndices(b, a, prefix_);
      if (!per_call) indices_checked_.store(true, std::memory_order_release);
    }
    Ort::KernelContext ctx(context);
    Ort::UnownedValue y = ctx.GetOutput(0, b.y_shape);
    if (b.M == 0) return;

    // X -> fp32 in stored column order (the GEMV path: in its lane order within each 8 columns).
    const int64_t M = b.M, K = a.K;
    // The packed path (any M): X in near-equal slices of at most kPackedMaxRows rows (per-thread lists, grow-only:
    // no allocation per call).
    thread_local std::vector<int64_t> slice_rows, slice_begin;
    thread_local std::vector<PackedGemvFn> slice_fns;
    slice_rows.clear();
    slice_fns.clear();
    // The packed prefill path (fp32 activations, UsePackedGemm): each block decoded once, then a GEMM.
    const CpuKernels& isa = *isa_;
    const PackedDecodeFn gemm_decode =
        allow_packed_ && isa.packed_decode != nullptr && !int8_ && UsePackedGemm(M, K, a.N)
            ? isa.packed_decode(Packed(b))
            : nullptr;
    // The packed GEMV in slices of up to packed_max_rows rows (AVX2: decode-sized M only; the portable GEMM above)
    if (allow_packed_ && gemm_decode == nullptr && (isa.packed_gemv_any_rows || M < kGemmMinRows)) {
      const PackedWeights& pw = Packed(b);
      const int64_t max_rows =
          pw.bits != 8 ? isa.packed_max_rows : std::min<int64_t>(isa.packed_max_rows, kPackedCodes8MaxRows);
      const int64_t slices = (M + max_rows - 1) / max_rows;
      for (int64_t i = 0; i < slices; ++i) {
        slice_rows.push_back(M / slices + (i < M % slices ? 1 : 0));
        const int64_t rows = slice_rows.back();
        slice_fns.push_back(int8_ ? isa.packed_gemv_int8(pw, rows) : isa.packed_gemv(pw, rows));
        if (slice_fns.back() == nullptr) {
          slice_fns.clear();
          break;
        }
      }
    }
    const bool packed_path = !slice_fns.empty() || gemm_decode != nullptr;
    if (require_packed_ && !packed_path) {
      throw Ort::Exception(prefix_ + "QCOMPILER_CPU_REQUIRE_PACKED=1 but the packed path is not available",
                           ORT_FAIL);
    }
    const bool gemv = !packed_path && M < kGemmMinRows && a.group_size % 8 == 0;
    const GemvRowAvx512Fn row512 =
        gemv && isa.gemv_row != nullptr && a.group_size % 16 == 0 ? isa.gemv_row(a.bits, M) : nullptr;
    const bool lane_x = gemv && row512 == nullptr;
    const int64_t xstride = (K + spqr::kChunk - 1) / spqr::kChunk * spqr::kChunk;
    // Per-call scratch lives on (thread_local, grow-only): fresh large buffers would be new pages every call, and
    // the kernel's page faults cost more than the matmul at prefill sizes.
    thread_local std::vector<float> xp;
    xp.resize(std::max(xp.size(), static_cast<size_t>(M * xstride)));
    const bool half_x = x_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const int32_t* perm = b.in[spqr::kPerm].present() ? b.in[spqr::kPerm].as<int32_t>() : nullptr;
    if (!packed_path) ConvertXRows(b.in[spqr::kX].data, half_x, perm, K, xstride, lane_x, xp.data(), 0, M);

    // With an activation, the product Z goes to scratch ([M, N], as Y would be), then Y = act(Z) (activation.h).
    thread_local std::vector<float> z_f32;
    thread_local std::vector<uint16_t> z_f16;
    float* y_f32 = nullptr;
    uint16_t* y_f16 = nullptr;
    if (half_x) {
      y_f16 = reinterpret_cast<uint16_t*>(y.GetTensorMutableData<Ort::Float16_t>());
    } else {
      y_f32 = y.GetTensorMutableData<float>();
    }
    if (a.activation != spqr::kActivationNone) {
      const size_t zn = static_cast<size_t>(M * a.N);
      if (half_x) {
        z_f16.resize(std::max(z_f16.size(), zn));
      } else {
        z_f32.resize(std::max(z_f32.size(), zn));
      }
    }
    auto run = [&](float* out_f32, uint16_t* out_f16) {
      Job j;
      j.a = a;
      j.M = M;
      j.qweight = b.in[spqr::kQWeight].as<uint8_t>();
      j.scales = b.in[spqr::kScales].data;
      j.zeros = b.in[spqr::kZeros].data;
      j.stats2 = b.in[spqr::kStats2].present() ? b.in[spqr::kStats2].as<uint16_t>() : nullptr;
      if (b.in[spqr::kRowPtr].present()) {
        j.row_ptr = b.in[spqr::kRowPtr].as<int32_t>();
        j.col_idx = b.in[spqr::kColIdx].as<uint16_t>();
        j.values = b.in[spqr::kValues].as<uint16_t>();
      }
      if (b.in[spqr::kBias].present()) {
        if (b.in[spqr::kBias].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
          j.bias_f32 = b.in[spqr::kBias].as<float>();
        } else {
          j.bias_f16 = b.in[spqr::kBias].as<uint16_t>();
        }
      }
      j.xp = xp.data();
      j.xstride = xstride;
      j.lane_x = lane_x;
      j.row512 = row512;
      j.y_f32 = out_f32;
      j.y_f16 = out_f16;
      thread_local std::vector<float> packed_x, xt;
      thread_local std::vector<int32_t> packed_xq;
      if (gemm_decode != nullptr) {
        // rows of X 64 bytes more than whole chunks apart: the micro-kernel reads kGemmRowsMax rows at once, which a
        // stride of a multiple of 4 KB would put in one L1 set (K = 4096 ran at 2/3 of the speed)
        const int64_t gstride = xstride + 16;
        xp.resize(std::max(xp.size(), static_cast<size_t>(M * gstride)));
        j.xp = xp.data();
        j.xstride = gstride;
        ConvertJob conv{b.in[spqr::kX].data, half_x, perm, K, gstride, xp.data(), M};
        ctx.ParallelFor(&ConvertTask, static_cast<size_t>((M + kConvertRows - 1) / kConvertRows), 0, &conv);
        j.packed.w = packed_.get();
        j.packed_decode = gemm_decode;
        for (int mr = 1; mr <= kGemmRowsMax; ++mr) j.packed_micro[mr] = isa.packed_micro(mr);
        j.halves_to_floats = isa.halves_to_floats;
        // blocks per task: X is read once per task; at least 12 tasks (where there are 12 blocks) so that 2, 3, 4 or 6
        // threads get equal shares (N = 576: 36 blocks as 9 tasks of 4 left one of 2 threads a task behind; as 12
        // tasks of 3, 576x576 at M = 64 took 288 instead of 331 us, medians of 4 alternating runs; 1536x576 within the
        // noise, 782 against 774 us; M = 512 unchanged)
        j.gemm_blocks = std::clamp<int64_t>((packed_->blocks + 11) / 12, 1, kPackedGemmMaxBlocks);
        ctx.ParallelFor(&PackedGemmTask, static_cast<size_t>((packed_->blocks + j.gemm_blocks - 1) / j.gemm_blocks), 0,
                        &j);
        return;
      }
      if (packed_path) {
        const PackedWeights& pw = *packed_;
        PackedPrep prep;
        prep.x = b.in[spqr::kX].data;
        prep.half_x = half_x;
        prep.perm = perm;
        prep.K = K;
        prep.M = M;
        prep.xstride = xstride;
        prep.xp = xp.data();
        prep.pw = &pw;
        slice_begin.assign(slice_rows.size(), 0);
        for (size_t i = 1; i < slice_rows.size(); ++i) slice_begin[i] = slice_begin[i - 1] + slice_rows[i - 1];
        prep.slice_rows = slice_rows.data();
        prep.slice_begin = slice_begin.data();
        if (int8_) {  // xq [M * chunks * 8] int32, then xd [M * chunks * XScalesPerChunk] and xg [M * G] fp32
          prep.xq_row = pw.chunks * 8;
          prep.xd_row = pw.chunks * XScalesPerChunk(pw);
          packed_xq.resize(std::max(packed_xq.size(), static_cast<size_t>(M * prep.xq_row)));
          packed_x.resize(std::max(packed_x.size(), static_cast<size_t>(M * (prep.xd_row + pw.G))));
          prep.xq = packed_xq.data();
          prep.int8_inputs = int8_inputs_;
          prep.xd = packed_x.data();
          prep.xg = prep.xd + M * prep.xd_row;
          j.packed.xq = prep.xq;
          j.packed.xd = prep.xd;
          j.packed_xq_row = prep.xq_row;
          j.packed_xd_row = prep.xd_row;
        } else {  // xs [M * xs_row], then xg [M * G]
          prep.xs_row = pw.chunks * PiecesPerChunk(static_cast<int>(pw.bits));
          packed_x.resize(std::max(packed_x.size(), static_cast<size_t>(M * (prep.xs_row + pw.G))));
          prep.xs = packed_x.data();
          prep.xg = prep.xs + M * prep.xs_row;
          j.packed.xs = prep.xs;
          j.packed_xs_row = prep.xs_row;
        }
        j.packed.xg = prep.xg;
        j.packed.xg_stride = pw.G;
        if (j.row_ptr != nullptr && M >= kTransposeMinRows) {
          xt.resize(std::max(xt.size(), static_cast<size_t>(K * M)));
          prep.xt = xt.data();
          j.xt = prep.xt;
        }
        if (slice_rows.size() == 1) {
          PackedPrepTask(&prep, 0);
        } else {
          ctx.ParallelFor(&PackedPrepTask, slice_rows.size(), 0, &prep);
        }
        j.packed_rows = slice_rows.data();
        j.packed_fns = slice_fns.data();
        j.packed_slices = slice_rows.size();
        j.packed.w = &pw;
        j.outlier_rows = isa.outlier_rows;
        j.halves_to_floats = isa.halves_to_floats;
        j.packed_task_blocks = kPackTaskBlocks;
        if (j.packed_slices > 1) {  // several slices: bigger tasks (at least 8 of them)
          const int64_t block_bytes = pw.chunks * PackedWordsPerChunk(pw) * kPackRows * 4;
          j.packed_task_blocks = std::clamp(std::min(kPackTaskBytes / block_bytes, (pw.blocks + 7) / 8), kPackTaskBlocks,
                                            kPackTaskMaxBlocks);
        }
        const int64_t tasks = (pw.blocks + j.packed_task_blocks - 1) / j.packed_task_blocks;
        ctx.ParallelFor(&PackedTask, static_cast<size_t>(tasks), 0, &j);
        return;
      }
      if (M >= kGemmMinRows) {
        ctx.ParallelFor(&TileTask, static_cast<size_t>((a.N + kGemvRows - 1) / kGemvRows), 0, &j);
        return;
      }
      if (gemv) {
        ctx.ParallelFor(&GemvTask, static_cast<size_t>((a.N + kGemvRows - 1) / kGemvRows), 0, &j);
        return;
      }
      // ~64 rows of work per task for GEMV-sized calls, fewer rows when each row serves many X rows.
      // (a multiple of kRowBlock).
      const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(64, a.N / 64) / std::max<int64_t>(1, M / 8));
      j.rows_per_task = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
      const int64_t tasks = (a.N + j.rows_per_task - 1) / j.rows_per_task;
      ctx.ParallelFor(&RowBlockTask, static_cast<size_t>(tasks), 0, &j);
    };
    if (a.activation == spqr::kActivationNone) {
      run(y_f32, y_f16);
      return;
    }
    run(half_x ? nullptr : z_f32.data(), half_x ? z_f16.data() : nullptr);
    ActivationJob act{a.N, half_x ? nullptr : z_f32.data(), half_x ? z_f16.data() : nullptr, y_f32, y_f16, M};
    const int64_t tasks = (M + kActivationRows - 1) / kActivationRows;
    if (tasks == 1) {
      ActivationTask(&act, 0);
    } else {
      ctx.ParallelFor(&ActivationTask, static_cast<size_t>(tasks), 0, &act);
    }
  }

 private:
  std::string prefix_;
  Attributes attrs_;
  ONNXTensorElementDataType x_type_;
  const CpuKernels* isa_ = nullptr;  // the ISA's kernels (QCOMPILER_CPU_ISA and this CPU)
  bool allow_packed_ = true;
  bool require_packed_ = false;
  bool require_kept_binding_ = false;
  bool release_pages_ = true;  // QCOMPILER_CPU_KEEP_PAGES=1: the stored weights stay resident after packing
  bool int8_ = false;
  PackedInt8InputsFn int8_inputs_ = nullptr;  // X's int8 preparation: the ISA table's, else the portable one
  std::once_flag pack_once_;
  std::array<std::once_flag, 2> halved_once_;       // float32 scales / zeros initializers converted to fp16
  std::array<std::vector<uint16_t>, 2> halved_;
  std::unique_ptr<PackedWeights> packed_;
  std::array<bool, spqr::kNumInputs> constant_{};  // input i is an initializer (same data on every call)
  std::atomic<bool> indices_checked_{false};       // constant index inputs already validated
  std::once_flag bound_once_;                      // Bind: the binding of the first call, all but X initializers
  std::atomic<bool> bound_ready_{false};
  BoundInputs bound_;
  size_t bound_count_ = 0;
};

}  // namespace

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const spqr::SpQRMatMulOp<SpQRMatMulCpuKernel> op_f32("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static const spqr::SpQRMatMulOp<SpQRMatMulCpuKernel> op_f16("CPUExecutionProvider",
                                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_f32);
  domain.Add(&op_f16);
}

}  // namespace Cpu
}  // namespace qcompiler