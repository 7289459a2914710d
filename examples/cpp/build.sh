#!/usr/bin/env bash
# Build examples/cpp against the onnxruntime in .venv (its libonnxruntime.so) into build/examples-cpp.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build/examples-cpp}
LIB=$(.venv/bin/python -c "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[0])")
INC=$(find build -name onnxruntime_cxx_api.h -path "*libonnxruntime-dev*" 2>/dev/null | head -1 || true)
cmake -S examples/cpp -B "$BUILD" -DONNXRUNTIME_LIBRARY="$LIB" ${INC:+-DONNXRUNTIME_INCLUDE_DIR="$(dirname "$INC")"} >/dev/null
cmake --build "$BUILD" -j "$(nproc)" >/dev/null
echo "$BUILD/qcompiler_decode"
