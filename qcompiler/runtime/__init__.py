"""Stage 5, running an exported folder: the op library and ONNX Runtime sessions (`ops`), generation with the KV cache
(`generate`), perplexity (`evaluate`), and the onnxruntime-genai config written next to the model (`genai`)."""
