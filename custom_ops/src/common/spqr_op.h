// ORT-facing pieces shared by the CPU and CUDA SpQRMatMul kernels: the OrtCustomOp definition (inputs, types,
// optional inputs, output shape inference), attribute reading and cheap input validation.
// Compiled by g++ only (nvcc cannot compile the ORT C++ headers).
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT  // the OrtApi comes from RegisterCustomOps; never link/lookup OrtGetApiBase
#endif
#include "onnxruntime_cxx_api.h"

#include <array>
#include <exception>
#include <string>
#include <vector>

#include "common/spqr_format.h"

namespace qcompiler {
namespace spqr {

constexpr const char* kDomain = "qcompiler";
constexpr const char* kOpName = "SpQRMatMul";

// Positional inputs (docs/spqr-format.md); 4..9 are optional.
enum InputIndex : size_t {
  kX = 0,
  kQWeight,
  kScales,
  kZeros,
  kStats2,
  kRowPtr,
  kColIdx,
  kValues,
  kPerm,
  kBias,
  kNumInputs
};

// One bound input: type, shape and data pointer (host or device, depending on the EP). `value == nullptr` when an
// optional input is omitted.
struct TensorArg {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  bool present() const { return value != nullptr; }
  int64_t numel() const;
  template <typename T>
  const T* as() const { return static_cast<const T*>(data); }
};

// All inputs of one Compute call, checked against the attributes.
struct BoundInputs {
  std::array<TensorArg, kNumInputs> in;
  int64_t M = 0;                 // rows of X after flattening its leading dims
  std::vector<int64_t> y_shape;  // [..., N]
  int64_t nnz = 0;               // number of outliers (0 when absent)
};

// "SpQRMatMul node '<name>': " (prefix of every error message of one kernel).
std::string ErrorPrefix(const OrtKernelInfo* info);

// Reads and validates the six int attributes; throws Ort::Exception (ORT_INVALID_ARGUMENT) naming the node.
Attributes ReadAttributes(const OrtKernelInfo* info, const std::string& prefix);

// Binds the inputs of `ctx` and checks dtypes and shapes against `attrs` (O(1) per input). With `host_data`
// (CPU EP) it also checks the CSR row pointers' first/last entries, which live in host memory.
BoundInputs BindInputs(OrtKernelContext* ctx, const Attributes& attrs, ONNXTensorElementDataType x_type,
                       const std::string& prefix, bool host_data);

// Shape inference: Y = X.shape[:-1] + [N], element type of X. Installed as OrtCustomOp::InferOutputShapeFn.
OrtStatusPtr InferOutputShape(const OrtCustomOp* op, OrtShapeInferContext* ctx);

OrtStatusPtr ToStatus(const std::exception& e);

// Base of the kernels: turns exceptions thrown by `Compute` into an OrtStatus (exceptions must not cross the C ABI).
template <typename Derived>
struct KernelBase {
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    try {
      static_cast<Derived*>(this)->Compute(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return ToStatus(e);
    }
  }
};

// The custom op: one instance per (execution provider, X element type). X, the optional bias and Y are typed so
// that ORT's type inference picks the output type from the matching kernel (Y has the type of X); scales/zeros
// (float16 or uint8 depending on `stat_bits`) and bias (float32 or float16) are type-erased and checked at runtime.
// Kernel requirements: Kernel(const OrtKernelInfo*, ONNXTensorElementDataType x_type) and ComputeV2.
template <typename Kernel>
struct SpQRMatMulOp : Ort::CustomOpBase<SpQRMatMulOp<Kernel>, Kernel, /*WithStatus=*/true> {
  SpQRMatMulOp(const char* provider, ONNXTensorElementDataType x_type) : provider_(provider), x_type_(x_type) {
    this->InferOutputShapeFn = &spqr::InferOutputShape;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info, x_type_);
      return nullptr;
    } catch (const std::exception& e) {
      return ToStatus(e);
    }
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return provider_; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kX: return x_type_;
      case kQWeight: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case kStats2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case kRowPtr: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case kColIdx: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
      case kValues: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case kPerm: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // scales, zeros, bias
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i <= kZeros ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*i*/) const { return x_type_; }

 private:
  const char* provider_;
  ONNXTensorElementDataType x_type_;
};

}  // namespace spqr
}  // namespace qcompiler
