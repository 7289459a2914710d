#!/usr/bin/env bash
# Build libqcompiler_ops.so with AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernel; the CUDA kernel is not
# built) and run the kernel tests and the fuzz suite against it; then the CUDA kernels under the CPU emulation with
# UBSan. Needs .venv (scripts/setup.sh) and a C++ compiler.
#   bash scripts/sanitize.sh [extra pytest args]
# The Python process is not instrumented, so libasan/libubsan are preloaded; leak checking is off (CPython and ORT
# keep allocations alive at exit by design); any ASan or UBSan report aborts the process and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${QCOMPILER_SANITIZE_BUILD:-build/sanitize}
# reuse the ORT headers the main build fetched, when present (no second download); same lookup as examples/cpp
INC=$(find build -name onnxruntime_cxx_api.h -path "*libonnxruntime-dev*" 2>/dev/null | head -1 || true)
cmake -S custom_ops -B "$BUILD" -DWITH_CUDA=OFF -DQCOMPILER_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  ${INC:+-DONNXRUNTIME_INCLUDE_DIR="$(dirname "$INC")"} > "$BUILD.cmake.log" 2>&1 || { cat "$BUILD.cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }
CXX=${CXX:-c++}
PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)"
echo "sanitized library: $BUILD/libqcompiler_ops.so (preload: $PRELOAD)"
QCOMPILER_OPS_LIBRARY="$BUILD/libqcompiler_ops.so" LD_PRELOAD="$PRELOAD" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_spqr_matmul_cpu.py tests/test_fuzz_spqr_matmul.py "$@"
# the CUDA kernels under the CPU emulation (tests/cuda_emu.py), their device code built with UBSan
QCOMPILER_EMU_SANITIZE=undefined UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_spqr_matmul_cuda.py tests/test_cuda_emu.py \
  tests/test_fuzz_spqr_matmul.py -k "emu or emulated"
