"""Stage 1, the model: model families as data (`families`), loading a HF folder / GGUF file / hub id (`loading`),
file-backed weights for models larger than memory (`offload`), and the checks run before any work (`preflight`)."""
