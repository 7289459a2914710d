// Entry point of libqcompiler_ops.so: registers the `qcompiler` custom-op domain (SpQRMatMul, opset 1) with a
// session. ONNX Runtime calls RegisterCustomOps from SessionOptions.register_custom_ops_library(path).
//
// The library is built against the ORT API headers with ORT_API_MANUAL_INIT and does not link libonnxruntime:
// every call goes through the OrtApi handed in here, so it loads into any runtime >= the headers' API version.
#include <memory>
#include <mutex>
#include <vector>

#include "common/spqr_op.h"
#include "cpu/spqr_matmul_cpu.h"
#include "cuda/spqr_matmul_cuda.h"

namespace {

// Build facts, read from the file by qcompiler.ops.has_cuda_kernel() without loading the library.
#ifdef QCOMPILER_WITH_CUDA
__attribute__((used)) const char kBuildInfo[] = "QCOMPILER_OPS_BUILD_INFO cuda=1";
#else
__attribute__((used)) const char kBuildInfo[] = "QCOMPILER_OPS_BUILD_INFO cuda=0";
#endif

// Domains must outlive every session that uses them.
std::vector<Ort::CustomOpDomain>& Domains() {
  static std::vector<Ort::CustomOpDomain> domains;
  return domains;
}
std::mutex& DomainsMutex() {
  static std::mutex m;
  return m;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Runtime older than the headers: report through API 1, which every runtime has.
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "qcompiler_ops: this ONNX Runtime is older than the ORT API "
                                                       "version the library was built against");
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain(qcompiler::spqr::kDomain);
    qcompiler::Cpu::RegisterOps(domain);  // always: a CUDA-only library fails on CPU sessions
    qcompiler::Cuda::RegisterOps(domain);  // no-op when built without CUDA
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(DomainsMutex());
    Domains().push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return qcompiler::spqr::ToStatus(e);
  }
}
