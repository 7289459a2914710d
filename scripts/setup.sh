#!/usr/bin/env bash
# Create .venv and install qcompiler (builds the custom-op library in custom_ops/ through CMake).
# torch is pinned to the CPU wheel first (2.13.0 satisfies the project's range), so pip pulls no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# onnxruntime-genai (tests/test_genai.py): --no-deps, because its dependency on the CPU `onnxruntime` package would
# overwrite onnxruntime-gpu's files; it runs on the onnxruntime-gpu already installed (same ORT version line).
.venv/bin/python -m pip install -q --no-deps "onnxruntime-genai==0.18.0"
.venv/bin/python -c "import qcompiler.ops as o; print('qcompiler ops library:', o.library_path())"
