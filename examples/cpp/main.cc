// Greedy decoding of a `qcompiler export` folder with the ONNX Runtime C++ API: registers OUT/libqcompiler_ops.so,
// feeds input_ids / attention_mask / position_ids / past_key_values.{i}.{key,value}, reads logits and
// present.{i}.{key,value}, and feeds the presents back as the next step's past (KV cache).
//
//   qcompiler_decode OUT PROMPT_IDS MAX_NEW_TOKENS     e.g.  qcompiler_decode out 5,17,3 10
// Prints the generated token ids, comma-separated (tokenization is left to the caller: the tokenizer.json in OUT
// works with the HF tokenizers library, or tokenizers-cpp).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) ids.push_back(std::stoll(item));
  return ids;
}

bool Exists(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s OUT PROMPT_IDS MAX_NEW_TOKENS\n", argv[0]);
    return 2;
  }
  const std::string folder = argv[1];
  const std::vector<int64_t> prompt = ParseIds(argv[2]);
  const int max_new = std::stoi(argv[3]);
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qcompiler_decode");
    Ort::SessionOptions options;
    const std::string library = folder + "/libqcompiler_ops.so";
    if (Exists(library)) {
      options.RegisterCustomOpsLibrary(library.c_str());
    } else {
      std::fprintf(stderr, "note: %s not found: running the portable fallback\n", library.c_str());
    }
    Ort::Session session(env, (folder + "/model.onnx").c_str(), options);
    Ort::AllocatorWithDefaultOptions alloc;

    std::vector<std::string> in_names, past_names, out_names{"logits"};
    bool has_positions = false;
    int64_t heads = 0, head_dim = 0;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      std::string name = session.GetInputNameAllocated(i, alloc).get();
      if (name.rfind("past_key_values.", 0) == 0) {
        past_names.push_back(name);
        out_names.push_back("present." + name.substr(std::string("past_key_values.").size()));
        auto shape = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();  // [b, heads, past, d]
        heads = shape.at(1);
        head_dim = shape.at(3);
      }
      has_positions |= name == "position_ids";
      in_names.push_back(name);
    }
    const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> past;
    float dummy = 0.f;
    for (size_t i = 0; i < past_names.size(); ++i) {
      const int64_t shape[4] = {1, heads, 0, head_dim};
      past.push_back(Ort::Value::CreateTensor<float>(cpu, &dummy, 0, shape, 4));
    }

    std::vector<int64_t> step = prompt, generated;
    int64_t start = 0;
    double prefill_s = 0, decode_s = 0;
    while (static_cast<int>(generated.size()) < max_new) {
      const auto t0 = std::chrono::steady_clock::now();
      const int64_t len = static_cast<int64_t>(step.size());
      std::vector<int64_t> mask(start + len, 1), positions(len);
      for (int64_t i = 0; i < len; ++i) positions[i] = start + i;
      const int64_t ids_shape[2] = {1, len}, mask_shape[2] = {1, start + len};
      std::vector<Ort::Value> feeds;
      std::vector<const char*> feed_names;
      for (const std::string& name : in_names) {
        feed_names.push_back(name.c_str());
        if (name == "input_ids") {
          feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu, step.data(), step.size(), ids_shape, 2));
        } else if (name == "attention_mask") {
          feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), mask_shape, 2));
        } else if (name == "position_ids") {
          feeds.push_back(Ort::Value::CreateTensor<int64_t>(cpu, positions.data(), positions.size(), ids_shape, 2));
        } else {
          const size_t k = std::find(past_names.begin(), past_names.end(), name) - past_names.begin();
          feeds.push_back(std::move(past.at(k)));
        }
      }
      std::vector<const char*> fetch_names;
      for (const std::string& n : out_names) fetch_names.push_back(n.c_str());
      std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{nullptr}, feed_names.data(), feeds.data(),
                                                    feeds.size(), fetch_names.data(), fetch_names.size());
      // logits [1, len, vocab]: argmax of the last row
      const auto shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();
      const int64_t vocab = shape.at(2);
      const float* row = outputs[0].GetTensorData<float>() + (len - 1) * vocab;
      const int64_t next = std::max_element(row, row + vocab) - row;
      generated.push_back(next);
      past.clear();
      for (size_t i = 1; i < outputs.size(); ++i) past.push_back(std::move(outputs[i]));
      start += len;
      step.assign(1, next);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      (generated.size() == 1 ? prefill_s : decode_s) += s;
    }
    for (size_t i = 0; i < generated.size(); ++i) std::printf(i ? ",%lld" : "%lld", static_cast<long long>(generated[i]));
    std::printf("\n");
    std::fprintf(stderr, "prefill %.1f tok/s, decode %.1f tok/s\n", prompt.size() / prefill_s,
                 generated.size() > 1 ? (generated.size() - 1) / decode_s : 0.0);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
