// CUDA kernel of qcompiler::SpQRMatMul, ORT-facing half (compiled by g++): binds and checks the inputs, then
// enqueues the fused decode+matmul kernels (launcher.cu) on ORT's compute stream.
#include "cuda/spqr_matmul_cuda.h"

#include "cuda/spqr_matmul_cuda_impl.cuh"

namespace qcompiler {
namespace Cuda {
namespace {

using spqr::BoundInputs;

// Device scratch from ORT's allocator for this node's device, on the compute stream (KernelContext_GetScratchBuffer:
// stream-ordered, so it may be handed back as soon as the kernels are enqueued), returned on destruction.
class Scratch {
 public:
  Scratch(OrtKernelContext* context, int device_id, size_t bytes)
      : context_(context), info_("Cuda", OrtArenaAllocator, device_id, OrtMemTypeDefault) {
    if (bytes == 0) return;
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetScratchBuffer(context_, info_, bytes, &data_));
    if (data_ == nullptr) throw Ort::Exception("no device scratch memory from ORT", ORT_FAIL);
  }
  ~Scratch() {
    if (data_ == nullptr) return;
    OrtAllocator* allocator = nullptr;
    if (Ort::GetApi().KernelContext_GetAllocator(context_, info_, &allocator) == nullptr && allocator != nullptr) {
      allocator->Free(allocator, data_);
      Ort::GetApi().ReleaseAllocator(allocator);
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* data() const { return data_; }

 private:
  OrtKernelContext* context_;
  Ort::MemoryInfo info_;
  void* data_ = nullptr;
};

struct SpQRMatMulCudaKernel : spqr::KernelBase<SpQRMatMulCudaKernel> {
  SpQRMatMulCudaKernel(const OrtKernelInfo* info, ONNXTensorElementDataType x_type)
      : prefix_(spqr::ErrorPrefix(info)),
        attrs_(spqr::ReadAttributes(info, prefix_)),
        x_type_(x_type),
        switches_(env::ReadCudaSwitches()) {}  // QCOMPILER_CUDA_*, read once per kernel (common/env_switches.h)

  void Compute(OrtKernelContext* context) {
    const spqr::Attributes& a = attrs_;
    // Index inputs live in device memory here: only dtypes and shapes are checked.
    BoundInputs b = spqr::BindInputs(context, a, x_type_, prefix_, /*host_data=*/false);
    for (size_t i : {spqr::kScales, spqr::kZeros}) {
      if (b.in[i].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        throw Ort::Exception(prefix_ + "the CUDA kernel reads scales/zeros as float16 (got float32)",
                             ORT_INVALID_ARGUMENT);
      }
    }
    Ort::KernelContext ctx(context);
    Ort::UnownedValue y = ctx.GetOutput(0, b.y_shape);
    if (b.M == 0) return;
    void* stream = ctx.GetGPUComputeStream();
    if (stream == nullptr) throw Ort::Exception(prefix_ + "no CUDA compute stream from ORT", ORT_FAIL);

    SpQRMatMulArgs args;
    args.M = b.M;
    args.K = a.K;
    args.N = a.N;
    args.bits = static_cast<int>(a.bits);
    args.group_size = a.group_size;
    args.stat_bits = static_cast<int>(a.stat_bits);
    args.stat_group_size = a.stat_group_size;
    args.x = b.in[spqr::kX].data;
    args.x_is_half = x_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    args.qweight = b.in[spqr::kQWeight].as<uint8_t>();
    args.scales = b.in[spqr::kScales].data;
    args.zeros = b.in[spqr::kZeros].data;
    args.stats2 = b.in[spqr::kStats2].as<uint16_t>();  // nullptr when absent
    args.row_ptr = b.in[spqr::kRowPtr].as<int32_t>();
    args.col_idx = b.in[spqr::kColIdx].as<uint16_t>();
    args.values = b.in[spqr::kValues].as<uint16_t>();
    args.perm = b.in[spqr::kPerm].as<int32_t>();
    args.bias = b.in[spqr::kBias].data;
    args.bias_is_half = b.in[spqr::kBias].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    args.activation = a.activation;
    args.y = y.GetTensorMutableRawData();
    const Scratch scratch(context, ctx.GetInput(spqr::kX).GetTensorMemoryInfo().GetDeviceId(), ScratchBytes(args));
    args.scratch = scratch.data();
    const int err = LaunchSpQRMatMul(args, switches_, stream);
    if (err != 0) {
      throw Ort::Exception(prefix_ + "CUDA kernel launch failed: " + CudaErrorString(err), ORT_EP_FAIL);
    }
  }

 private:
  std::string prefix_;
  spqr::Attributes attrs_;
  ONNXTensorElementDataType x_type_;
  env::CudaSwitches switches_;
};

}  // namespace

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const spqr::SpQRMatMulOp<SpQRMatMulCudaKernel> op_f32("CUDAExecutionProvider",
                                                                ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static const spqr::SpQRMatMulOp<SpQRMatMulCudaKernel> op_f16("CUDAExecutionProvider",
                                                                ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&op_f32);
  domain.Add(&op_f16);
}

}  // namespace Cuda
}  // namespace qcompiler
