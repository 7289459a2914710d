#!/usr/bin/env bash
# Cross-compile libqcompiler_ops.so for aarch64 (Jetson-class edge boxes): the portable CPU paths (GCC vector
# extensions -> NEON) and everything outside the x86-only AVX-512 files must build there. Compile and link only:
# nothing here runs the aarch64 library (no aarch64 machine or emulator with ONNX Runtime in CI).
#   bash scripts/cross_aarch64.sh        (needs aarch64-linux-gnu-g++: apt-get install g++-aarch64-linux-gnu)
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
if ! command -v "$CXX" >/dev/null; then
  echo "note: $CXX not found; the aarch64 cross-build was skipped"
  exit 0
fi
BUILD=${QCOMPILER_AARCH64_BUILD:-build/aarch64}
INC=$(find build -name onnxruntime_cxx_api.h -path "*libonnxruntime-dev*" 2>/dev/null | head -1 || true)
cmake -S custom_ops -B "$BUILD" -DWITH_CUDA=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_SYSTEM_NAME=Linux \
  -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_C_COMPILER="${CXX%g++}gcc" \
  ${INC:+-DONNXRUNTIME_INCLUDE_DIR="$(dirname "$INC")"} > "$BUILD.cmake.log" 2>&1 || { cat "$BUILD.cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD.build.log" 2>&1 || { grep -E "error" "$BUILD.build.log" | head -20; exit 1; }
# ELF e_machine (bytes 18-19) 183 = EM_AARCH64
[ "$(od -An -t u2 -j 18 -N 2 "$BUILD/libqcompiler_ops.so" | tr -d " ")" = 183 ] || { echo "not an aarch64 library: $BUILD/libqcompiler_ops.so"; exit 1; }
echo "aarch64 library: $BUILD/libqcompiler_ops.so"
