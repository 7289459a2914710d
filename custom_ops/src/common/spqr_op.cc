#include "common/spqr_op.h"

#include <limits>
#include <sstream>

namespace qcompiler {
namespace spqr {
namespace {

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED: return "undefined";
    default: return "other";
  }
}

const char* const kInputNames[kNumInputs] = {"X",   "qweight", "scales", "zeros", "stats2", "outlier_row_ptr",
                                             "outlier_col_idx", "outlier_values", "perm", "bias"};

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

[[noreturn]] void Fail(const std::string& prefix, const std::string& what) {
  throw Ort::Exception(prefix + what, ORT_INVALID_ARGUMENT);
}

void ExpectType(const std::string& prefix, const TensorArg& t, size_t idx, ONNXTensorElementDataType want) {
  if (t.type != want) {
    Fail(prefix, std::string("input ") + kInputNames[idx] + " must be " + TypeName(want) + ", got " + TypeName(t.type));
  }
}

void ExpectShape(const std::string& prefix, const TensorArg& t, size_t idx, const std::vector<int64_t>& want,
                 const char* why) {
  if (t.shape != want) {
    Fail(prefix, std::string("input ") + kInputNames[idx] + " has shape " + ShapeStr(t.shape) + ", expected " +
                     ShapeStr(want) + " (" + why + ")");
  }
}

// The `activation` attribute's value → kActivation*; -1 for a value this library does not know.
int ParseActivation(const std::string& name) {
  if (name.empty()) return kActivationNone;
  if (name == "silu_mul") return kActivationSiluMul;
  return -1;
}

}  // namespace

int64_t TensorArg::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

OrtStatusPtr ToStatus(const std::exception& e) {
  const auto* ort = dynamic_cast<const Ort::Exception*>(&e);
  return Ort::GetApi().CreateStatus(ort ? ort->GetOrtErrorCode() : ORT_RUNTIME_EXCEPTION, e.what());
}

std::string ErrorPrefix(const OrtKernelInfo* info) {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const std::exception&) {
  }
  return std::string(kOpName) + " node '" + name + "': ";
}

Attributes ReadAttributes(const OrtKernelInfo* info, const std::string& prefix) {
  Ort::ConstKernelInfo ki(info);
  auto get = [&](const char* name) -> int64_t {
    int64_t v = 0;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
    if (st != nullptr) {
      Ort::GetApi().ReleaseStatus(st);
      Fail(prefix, std::string("missing int attribute '") + name + "'");
    }
    return v;
  };
  Attributes a;
  a.K = get("K");
  a.N = get("N");
  a.bits = get("bits");
  a.group_size = get("group_size");
  a.stat_bits = get("stat_bits");
  a.stat_group_size = get("stat_group_size");
  {  // optional
    int64_t v = 0;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, "accuracy_level", &v);
    if (st != nullptr) {
      Ort::GetApi().ReleaseStatus(st);
      v = 0;
    }
    a.accuracy_level = v;
  }
  std::string activation;
  {  // optional string
    size_t size = 0;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_string(info, "activation", nullptr, &size);
    if (st != nullptr) {
      Ort::GetApi().ReleaseStatus(st);
      size = 0;
    }
    if (size > 1) {
      activation.resize(size);
      Ort::ThrowOnError(Ort::GetApi().KernelInfoGetAttribute_string(info, "activation", activation.data(), &size));
      activation.resize(size - 1);  // the size counts the terminating NUL
    }
  }
  a.activation = ParseActivation(activation);
  std::ostringstream bad;
  if (a.K <= 0 || a.N <= 0) bad << "K and N must be positive (K=" << a.K << ", N=" << a.N << "); ";
  // Index inputs (row pointers, permutation) are int32: larger dims cannot be addressed (and would overflow sizes).
  constexpr int64_t kMaxDim = 2147483647;
  if (a.K > kMaxDim || a.N > kMaxDim) bad << "K and N must be at most " << kMaxDim << " (K=" << a.K << ", N=" << a.N << "); ";
  if ((a.bits < 2 || a.bits > 4) && a.bits != 8) bad << "bits must be 2, 3, 4 or 8, got " << a.bits << "; ";
  if (a.group_size <= 0) bad << "group_size must be positive, got " << a.group_size << "; ";
  if (!(a.stat_bits == 0 || (a.stat_bits >= 2 && a.stat_bits <= 4)))
    bad << "stat_bits must be 0, 2, 3 or 4, got " << a.stat_bits << "; ";
  if (a.stat_group_size <= 0) bad << "stat_group_size must be positive, got " << a.stat_group_size << "; ";
  if (a.accuracy_level < 0 || a.accuracy_level > 4)
    bad << "accuracy_level must be 0..4, got " << a.accuracy_level << "; ";
  if (a.activation < 0) bad << "activation must be \"\" or \"silu_mul\", got \"" << activation << "\"; ";
  if (a.activation == kActivationSiluMul && a.N % 2 != 0)
    bad << "activation \"silu_mul\" needs an even N (gate rows, then as many up rows), got N=" << a.N << "; ";
  if (!bad.str().empty()) Fail(prefix, "bad attributes: " + bad.str());
  return a;
}

BoundInputs BindInputs(OrtKernelContext* context, const Attributes& a, ONNXTensorElementDataType x_type,
                       const std::string& prefix, bool host_data) {
  const OrtApi& api = Ort::GetApi();
  Ort::KernelContext ctx(context);
  BoundInputs b;
  const size_t count = ctx.GetInputCount();
  for (size_t i = 0; i < kNumInputs && i < count; ++i) {
    const OrtValue* v = nullptr;
    Ort::ThrowOnError(api.KernelContext_GetInput(context, i, &v));
    if (v == nullptr) continue;
    TensorArg& t = b.in[i];
    t.value = v;
    Ort::ConstValue cv(v);
    auto info = cv.GetTensorTypeAndShapeInfo();
    t.type = info.GetElementType();
    t.shape = info.GetShape();
    t.data = cv.GetTensorRawData();
  }
  for (size_t i = 0; i <= kZeros; ++i) {
    if (!b.in[i].present()) Fail(prefix, std::string("required input ") + kInputNames[i] + " is missing");
  }

  // X [..., K]
  const TensorArg& x = b.in[kX];
  ExpectType(prefix, x, kX, x_type);
  if (x.shape.empty() || x.shape.back() != a.K) {
    Fail(prefix, "input X has shape " + ShapeStr(x.shape) + ": its last dim must equal K=" + std::to_string(a.K));
  }
  b.M = x.numel() / a.K;
  if (b.M > 0 && a.N > std::numeric_limits<int64_t>::max() / b.M) {
    Fail(prefix, "output [" + std::to_string(b.M) + ", " + std::to_string(a.N) + "] is too large");
  }
  b.y_shape = x.shape;
  b.y_shape.back() = a.out_cols();

  const int64_t G = a.n_groups();
  ExpectType(prefix, b.in[kQWeight], kQWeight, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  ExpectShape(prefix, b.in[kQWeight], kQWeight, {a.N, PackedRowBytes(a.K, a.bits)}, "[N, ceil(K/32)*4*bits]");

  for (size_t i : {size_t(kScales), size_t(kZeros)}) {
    if (a.stat_bits == 0) {
      // float32 is accepted too: ONNX Runtime's CPU EP may cast them up when it moves an fp16 graph to fp32
      // (the kernels convert them back to fp16, exactly for values that came from fp16)
      if (b.in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        ExpectType(prefix, b.in[i], i, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
      ExpectShape(prefix, b.in[i], i, {G, a.N}, "[G, N] with G = ceil(K/group_size)");
    } else {
      ExpectType(prefix, b.in[i], i, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
      ExpectShape(prefix, b.in[i], i, {G, PackedRowBytes(a.N, a.stat_bits)}, "[G, ceil(N/32)*4*stat_bits]");
    }
  }

  if (a.stat_bits > 0) {
    if (!b.in[kStats2].present()) Fail(prefix, "input stats2 is required when stat_bits > 0");
    ExpectType(prefix, b.in[kStats2], kStats2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
    ExpectShape(prefix, b.in[kStats2], kStats2, {G, a.n_stat_groups(), 4}, "[G, ceil(N/stat_group_size), 4]");
  } else if (b.in[kStats2].present()) {
    Fail(prefix, "input stats2 must be omitted when stat_bits == 0");
  }

  const int n_outlier_inputs = b.in[kRowPtr].present() + b.in[kColIdx].present() + b.in[kValues].present();
  if (n_outlier_inputs != 0 && n_outlier_inputs != 3) {
    Fail(prefix, "outlier_row_ptr, outlier_col_idx and outlier_values must be given together (all or none)");
  }
  if (n_outlier_inputs == 3) {
    ExpectType(prefix, b.in[kRowPtr], kRowPtr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
    ExpectType(prefix, b.in[kColIdx], kColIdx, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16);
    ExpectType(prefix, b.in[kValues], kValues, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
    ExpectShape(prefix, b.in[kRowPtr], kRowPtr, {a.N + 1}, "[N + 1]");
    if (b.in[kColIdx].shape.size() != 1 || b.in[kValues].shape != b.in[kColIdx].shape) {
      Fail(prefix, "outlier_col_idx " + ShapeStr(b.in[kColIdx].shape) + " and outlier_values " +
                       ShapeStr(b.in[kValues].shape) + " must both be [nnz]");
    }
    b.nnz = b.in[kColIdx].shape[0];
    if (a.K > 65536) {
      Fail(prefix, "outliers need K <= 65536 (uint16 column indices), got K=" + std::to_string(a.K));
    }
    if (host_data) {
      const int32_t* rp = b.in[kRowPtr].as<int32_t>();
      if (rp[0] != 0 || rp[a.N] != b.nnz) {
        Fail(prefix, "outlier_row_ptr must start at 0 and end at nnz=" + std::to_string(b.nnz) + ", got " +
                         std::to_string(rp[0]) + " .. " + std::to_string(rp[a.N]));
      }
    }
  }

  if (b.in[kPerm].present()) {
    ExpectType(prefix, b.in[kPerm], kPerm, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
    ExpectShape(prefix, b.in[kPerm], kPerm, {a.K}, "[K]");
  }
  if (b.in[kBias].present()) {
    const TensorArg& bias = b.in[kBias];
    if (bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      Fail(prefix, std::string("input bias must be float32 or float16, got ") + TypeName(bias.type));
    }
    ExpectShape(prefix, bias, kBias, {a.N}, "[N]");
  }
  return b;
}

OrtStatusPtr InferOutputShape(const OrtCustomOp* /*op*/, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  // The info returned for an input is owned by the context: do not release it.
  OrtTensorTypeAndShapeInfo* x_info = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, kX, &x_info)) return st;
  ONNXTensorElementDataType x_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  if (OrtStatus* st = api.GetTensorElementType(x_info, &x_type)) return st;
  if (OrtStatus* st = api.GetDimensionsCount(x_info, &rank)) return st;
  if (rank == 0) return nullptr;  // unknown rank (or a scalar X, rejected at run time): leave Y's shape unknown

  std::vector<int64_t> dims(rank);
  std::vector<const char*> syms(rank, nullptr);
  if (OrtStatus* st = api.GetDimensions(x_info, dims.data(), rank)) return st;
  if (OrtStatus* st = api.GetSymbolicDimensions(x_info, syms.data(), rank)) return st;

  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetAttribute(ctx, "N", &attr)) return st;
  int64_t n = 0;
  size_t n_bytes = 0;
  if (OrtStatus* st = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &n_bytes)) return st;
  {  // "silu_mul" halves the last dim (an absent or unreadable attribute: none)
    const OrtOpAttr* act = nullptr;
    OrtStatus* ast = api.ShapeInferContext_GetAttribute(ctx, "activation", &act);
    if (ast != nullptr) {
      api.ReleaseStatus(ast);
    } else if (act != nullptr) {
      char text[32] = {0};
      size_t text_bytes = 0;
      OrtStatus* rst = api.ReadOpAttr(act, ORT_OP_ATTR_STRING, text, sizeof(text) - 1, &text_bytes);
      if (rst != nullptr) {
        api.ReleaseStatus(rst);
      } else if (ParseActivation(std::string(text)) == kActivationSiluMul) {  // text: NUL-terminated (zeroed)
        n /= 2;
      }
    }
  }
  dims[rank - 1] = n;
  syms[rank - 1] = "";
  for (size_t i = 0; i + 1 < rank; ++i) {
    if (syms[i] == nullptr) syms[i] = "";
    // A dim with neither a value nor a name cannot be expressed through this API (it would become -1): leave the
    // output shape unknown rather than writing a wrong one.
    if (dims[i] < 0 && syms[i][0] == '\0') return nullptr;
  }

  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&y_info)) return st;
  OrtStatus* st = api.SetTensorElementType(y_info, x_type);
  if (st == nullptr) st = api.SetDimensions(y_info, dims.data(), rank);
  if (st == nullptr) st = api.SetSymbolicDimensions(y_info, syms.data(), rank);
  if (st == nullptr) st = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, y_info);
  api.ReleaseTensorTypeAndShapeInfo(y_info);
  return st;
}

}  // namespace spqr
}  // namespace qcompiler
